"""detect: background plate, boxes against the drawn truth, centred crops, skip and refusal paths."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from vision_scene import PRODUCT_BGR, iou, make_scene, write_images

from defectflow import detect
from defectflow.config import params_from_dict
from defectflow.imgops import crop_square, safe_name, square_box
from defectflow.manifest import DETECT, FRAMES, read_manifest, read_meta

CROP = 64


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(**detect_params):
    return params_from_dict({"detect": {"crop_size": CROP, **detect_params}})


def _product_pixels(img):
    return np.all(np.abs(img.astype(int) - PRODUCT_BGR) < 40, axis=2)


def test_boxes_match_truth_and_crops_are_centred(cwd):
    scene = make_scene(Path("data"))
    report = detect.run(_params(), scene.inp, Path("out/detect"))
    df = read_manifest("out/detect/manifest.parquet", DETECT)

    assert len(df) == len(scene.rows) - 1                     # the empty-belt frame is dropped
    assert set(df.item_id) == set(scene.boxes)
    assert any("1 frame(s) with no foreground dropped" in n for n in report.notes)
    for row in df.itertuples():
        box = (row.box_x0, row.box_y0, row.box_x1, row.box_y1)
        assert iou(box, scene.boxes[row.item_id]) > 0.8, row.item_id
        assert row.image_path.startswith("out/detect/crops/") and row.detect_score == 1.0
        crop = cv2.imread(row.image_path)
        assert crop.shape == (CROP, CROP, 3)
        ys, xs = np.nonzero(_product_pixels(crop))
        centre = (CROP - 1) / 2
        assert abs(xs.mean() - centre) < 2 and abs(ys.mean() - centre) < 2
        # the product's long side fills 1 / (1 + 2 * margin) of the crop
        assert abs((xs.max() - xs.min() + 1) - CROP / 1.2) < 3
    plate = cv2.imread(df.background_path.iloc[0])
    assert np.abs(plate.astype(int) - scene.belt).mean() < 6     # the median is the empty belt
    src = scene.rows.set_index("item_id")
    assert (df.frame_index.to_numpy() == src.loc[df.item_id, "frame_index"].to_numpy()).all()


def test_plate_from_manifest_frames_when_video_is_gone(cwd):
    scene = make_scene(Path("data"), n_passes=1, spread=True, empty_frame=False)
    Path(scene.rows.video_path.iloc[0]).unlink()
    report = detect.run(_params(), scene.inp, Path("out/detect"))
    df = read_manifest("out/detect/manifest.parquet", DETECT)
    assert any("0 from videos, 1 from manifest frames" in n for n in report.notes)
    inner = [r for r in df.itertuples() if 0 < r.box_x0 and r.box_x1 < 160]   # fully in view
    assert len(inner) >= 5
    for row in inner:
        assert iou((row.box_x0, row.box_y0, row.box_x1, row.box_y1), scene.boxes[row.item_id]) > 0.8


def test_images_source_is_forwarded_and_says_so(cwd):
    img = np.full((40, 50, 3), 128, np.uint8)
    src = write_images(Path("frames"), [img, img], FRAMES)
    report = detect.run(_params(), Path("frames"), Path("out/detect"))
    df = read_manifest("out/detect/manifest.parquet", DETECT)
    assert list(df.item_id) == list(src.item_id) and list(df.image_path) == list(src.image_path)
    assert df.box_x0.isna().all()
    assert read_meta("out/detect/manifest.parquet")["skipped"].startswith("images source")
    assert any("skipped" in n for n in report.notes)


def test_missing_onnx_model_is_refused_clearly(cwd):
    scene = make_scene(Path("data"), n_passes=1)
    with pytest.raises(detect.DetectorUnavailable, match=r"missing\.onnx: ONNX model file not found"):
        detect.run(_params(method="onnx", onnx_model="models/missing.onnx"), scene.inp, Path("out/detect"))
    assert not Path("out/detect").exists()


def test_square_crop_is_black_where_it_leaves_the_frame():
    img = np.full((100, 100, 3), 200, np.uint8)
    x0, y0, side = square_box((0, 0, 20, 10), margin=0.5)       # longer side 20 -> side 40, centred (10, 5)
    assert (x0, y0, side) == (-10, -15, 40)
    crop = crop_square(img, (x0, y0, side), 40)
    assert crop.shape == (40, 40, 3)
    assert (crop[:15] == 0).all() and (crop[:, :10] == 0).all() and (crop[15:, 10:] == 200).all()


def test_no_foreground_gives_no_box():
    plate = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    assert detect.detect_box(plate.copy(), plate, 30) is None


def test_safe_file_names_never_collide():
    assert safe_name("r1_cam0_f0001") == "r1_cam0_f0001"
    names = {safe_name(x) for x in ("a/b", "a_b", "a b", "../a_b", "")}
    assert len(names) == 5 and all("/" not in n and n and not n.startswith(".") for n in names)


def test_track_box_is_refined_without_taking_the_touching_neighbour():
    plate = np.full((60, 120, 3), 60, np.uint8)
    frame = plate.copy()
    frame[10:50, 20:50] = (200, 200, 200)                         # the product
    frame[10:50, 50:80] = (180, 220, 180)                         # its neighbour, touching it
    got = detect.refine_track_box(frame, plate, (22, 12, 49, 47), diff_threshold=30)
    assert got == (20, 10, 49, 50)                                # grown to the product, not into the neighbour
    assert detect.refine_track_box(plate, plate, (23, 12, 49, 47), 30) == (23, 12, 49, 47)   # no foreground


def test_plate_leaves_out_the_tracked_products():
    rng = np.random.default_rng(0)
    belt = rng.integers(40, 90, (30, 40, 3), dtype=np.uint8)
    frames, covers = [], []
    for k in range(9):
        f, c = belt.copy(), np.zeros((30, 40), bool)
        if k % 3:                                                 # a product over the left half in 2 of 3
            f[:, :20], c[:, :22] = 230, True
        frames.append(f)
        covers.append(c)
    assert (detect.median_plate(frames)[:, :20] == 230).all()     # the plain median takes the product
    assert np.array_equal(detect.masked_median_plate(frames, covers), belt)
