"""Bring-your-own ONNX detector: a tiny YOLO-style model exported by the test itself.

The "network" finds the bright blob of its (letterboxed) input exactly: its box from the
rows/columns where the grey level is over 0.5, written into a YOLOv5 (1, N, 5+C) or YOLOv8
(1, 4+C, N) output together with decoys: an overlapping weaker duplicate (NMS removes it), a
box under the score threshold, and for the class test a stronger box of another class.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from vision_scene import iou, make_scene

from defectflow import detect
from defectflow.config import ParamsError, params_from_dict
from defectflow.manifest import DETECT, read_manifest, read_meta

SIZE = 64          # model input side
N = 16             # boxes per output


class BlobYolo(torch.nn.Module):
    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout

    def forward(self, x):                                    # x: (1, 3, H, W) RGB 0..1
        mask = (x.mean(dim=1)[0] > 0.5).float()              # (H, W)
        h, w = mask.shape
        cols, rows = mask.amax(dim=0), mask.amax(dim=1)
        xs, ys = torch.arange(w, dtype=x.dtype), torch.arange(h, dtype=x.dtype)
        x1, y1 = (cols * (xs + 1)).max(), (rows * (ys + 1)).max()
        x0, y0 = w - (cols * (w - xs)).max(), h - (rows * (h - ys)).max()
        cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        one, z = torch.ones(()), torch.zeros(())
        # [cx, cy, w, h, obj, cls0, cls1]
        rows_ = [torch.stack([cx, cy, bw, bh, one * 0.9, one * 0.95, z]),        # the blob, class 0
                 torch.stack([cx + 1, cy, bw, bh, one * 0.6, one * 0.9, z]),     # duplicate: NMS drops it
                 torch.stack([cx * 0 + 8, cy * 0 + 8, one * 6, one * 6, one * 0.1, one, z]),   # under threshold
                 torch.stack([cx * 0 + 50, cy * 0 + 50, one * 10, one * 10, one, z, one * 0.99])]  # class 1
        out = torch.stack(rows_ + [torch.zeros(7)] * (N - len(rows_)))           # (N, 7)
        if self.layout == "yolov8":                                              # (4 + C, N), score = class
            out = torch.cat([out[:, :4], out[:, 5:] * out[:, 4:5]], dim=1).T
        return out[None]


def _export(path: Path, layout: str) -> Path:
    torch.onnx.export(BlobYolo(layout), torch.rand(1, 3, SIZE, SIZE), str(path), dynamo=False,
                      input_names=["images"], output_names=["output0"], opset_version=17)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {layout: _export(root / f"{layout}.onnx", layout) for layout in ("yolov5", "yolov8")}


def _frame(box=(70, 30, 110, 90), shape=(120, 160)):
    img = np.full((*shape, 3), 40, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 230
    return img


@pytest.mark.parametrize("layout", ["yolov5", "yolov8"])
@pytest.mark.parametrize("declared", ["auto", "explicit"])
def test_box_found_through_letterbox_threshold_and_nms(models, layout, declared):
    det = detect.OnnxDetector(models[layout], score_threshold=0.25, nms_iou=0.45, class_id=0,
                              layout="auto" if declared == "auto" else layout)
    assert det.size == (SIZE, SIZE)
    for true in [(70, 30, 110, 90), (5, 60, 45, 118), (120, 2, 158, 20)]:
        found = det.detect(_frame(true))
        assert found is not None
        box, score = found
        assert iou(box, true) > 0.85, (box, true)
        expected = 0.9 * 0.95 if layout == "yolov5" else 0.9 * 0.95
        assert score == pytest.approx(expected, abs=1e-5)


def test_class_filter_and_threshold(models):
    any_class = detect.OnnxDetector(models["yolov5"], score_threshold=0.25)
    box, score = any_class.detect(_frame())
    assert score == pytest.approx(0.99) and box[0] > 100          # the class-1 box at (50, 50) in input px
    strict = detect.OnnxDetector(models["yolov5"], score_threshold=0.9, class_id=0)
    assert strict.detect(_frame()) is None                        # 0.855 < 0.9


def test_parse_yolo_layouts():
    v5 = np.array([[[10, 20, 4, 6, 0.5, 0.2, 0.8]]], np.float32)
    boxes, scores = detect.parse_yolo(v5, "yolov5")
    assert boxes.tolist() == [[10, 20, 4, 6]] and scores == pytest.approx([0.4])
    v8 = np.zeros((1, 6, 100), np.float32)
    v8[0, :, 3] = [10, 20, 4, 6, 0.1, 0.7]
    boxes, scores = detect.parse_yolo(v8)                          # auto: 100 boxes on the last axis
    assert boxes[3].tolist() == [10, 20, 4, 6] and scores[3] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="shape"):
        detect.parse_yolo(np.zeros((2, 3, 4, 5)))


def test_letterbox_maps_back():
    img, r, (px, py) = detect.letterbox(np.zeros((120, 160, 3), np.uint8), (64, 64))
    assert img.shape == (64, 64, 3) and r == pytest.approx(0.4) and (px, py) == (0, 8)
    assert (img[:8] == detect.LETTERBOX_FILL).all() and (img[8:56] == 0).all()


def test_missing_or_invalid_model_is_named(tmp_path):
    with pytest.raises(detect.DetectorUnavailable, match=r"nope\.onnx: ONNX model file not found"):
        detect.OnnxDetector(tmp_path / "nope.onnx")
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(detect.DetectorUnavailable, match=r"junk\.onnx: not a usable ONNX model"):
        detect.OnnxDetector(bad)
    with pytest.raises(ParamsError, match="detect: .*onnx_model"):
        params_from_dict({"detect": {"method": "onnx"}})


def test_stage_with_onnx_detector(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene = make_scene(Path("data"), empty_frame=False)    # the toy model has no notion of "empty"
    params = params_from_dict({"detect": {"method": "onnx", "onnx_model": str(models["yolov8"]),
                                          "onnx_class": 0, "crop_size": 64}})
    report = detect.run(params, scene.inp, Path("out/detect"))
    df = read_manifest("out/detect/manifest.parquet", DETECT)
    assert set(df.item_id) == set(scene.boxes)
    assert df.detect_score.round(4).eq(round(0.9 * 0.95, 4)).all()
    inner = [r for r in df.itertuples() if 0 < r.box_x0 and r.box_x1 < 160]
    assert inner
    for row in inner:
        assert iou((row.box_x0, row.box_y0, row.box_x1, row.box_y1), scene.boxes[row.item_id]) > 0.8
        assert cv2.imread(row.image_path).shape == (64, 64, 3)
    assert df.background_path.notna().all()                        # masks still gets its plates
    meta = read_meta("out/detect/manifest.parquet")
    assert meta["detector"] == "onnx" and meta["onnx_model"].endswith("yolov8.onnx")
    assert any("detector: onnx" in n for n in report.notes)


def test_detect_all_and_the_box_nearest_the_track(models):
    det = detect.OnnxDetector(models["yolov5"], score_threshold=0.25, class_id=None)
    frame = _frame()
    found = det.detect_all(frame)
    assert len(found) == 2                                   # the blob, and the class-1 decoy; NMS took the duplicate
    blob = max(found, key=lambda f: iou(f[0], (70, 30, 110, 90)))
    assert iou(blob[0], (70, 30, 110, 90)) > 0.8
    assert detect._best_overlap(found, (72, 32, 108, 88)) == blob      # with a track box: the one overlapping it
    assert detect._best_overlap(found, (0, 0, 5, 5)) is None
