"""Stage detect (FRAMES -> DETECT): find the product in each video frame and crop it.

Classical detector: per run + camera a background plate, the per-pixel median of
frames sampled evenly over that camera's whole video (moving products vanish, the
empty belt is left); where the frames stage logged tracks (``tracks_path``), each
sample's tracked product boxes are left out of the median, so the plate is right even
when products cover the belt most of the time. The frames in the manifest alone would
not do: they are the window around each pass's centre; they are only the fallback when
the video cannot be read. Then per frame, with the frames stage's track box
(``track_x0..``, several products in view): no second search; the box is refined to the
foreground against the plate within the track box grown by ``TRACK_GROW`` of its size,
each side kept at the track's edge where the foreground runs on (a touching neighbour).
Without a track box: difference from the plate -> threshold -> morphology -> largest
external contour -> box (x1/y1 exclusive, frame pixels). The crop is a square re-centred on
the box with ``detect.margin`` of its longer side added on each side (black where
it leaves the frame), resized to ``detect.crop_size``. Image sources (no video)
skip the stage.

Bring-your-own detector (``detect.method: onnx``, ``detect.onnx_model``): a YOLO-style ONNX
model run with onnxruntime (CPU, 2 threads). Input: the frame letterboxed (aspect kept, grey
114 padding) to the model's input size, RGB, 0..1, 1x3xHxW. Output: YOLOv5 layout (1, N, 5+C)
``[cx, cy, w, h, obj, cls...]`` (score = obj * best class) or YOLOv8 layout (1, 4+C, N)
``[cx, cy, w, h, cls...]`` (score = best class), in input pixels. Boxes under
``detect.score_threshold`` are dropped, the rest go through NMS (``detect.nms_iou``) and the
best box of the frame is kept (with a track box: the box overlapping it most). The background
plates are still built: masks uses them.
"""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.fsutil import read_image, write_image
from defectflow.imgops import colour_diff, crop_square, odd, safe_name, square_box
from defectflow.manifest import DETECT, FRAMES, read_manifest, write_manifest
from defectflow.stage import skip_stage
from defectflow.stage import StageOutput, StageReport, logger, manifest_path, stage_run
from defectflow.units import Mapper, Unit, UnitOutcome, UnitResult, group_units, map_units, merge_rows
from defectflow.units.core import POS, quarantine_meta, results

log = logger("detect")

PLATE_SAMPLES = 25      # frames per video used for the background median
TRACK_GROW = 0.1        # a track box is refined within itself grown by this share of its size
TRACK_MIN_FILL = 0.25   # ... to the foreground there, unless that covers less than this share of it
TRACK_COLS = ["track_x0", "track_y0", "track_x1", "track_y1"]
MIN_PLATE_FRAMES = 3    # fewer than this and the median is not a background
MIN_BLOB = 0.0005       # smallest foreground blob, fraction of the frame area (at least 16 px)

Box = tuple[int, int, int, int]


class DetectError(DefectflowError):
    """A camera's frames cannot be detected in (no background plate, sizes differ)."""


class DetectorUnavailable(DefectflowError):
    """The chosen detector cannot be used (model file missing or invalid, onnxruntime missing)."""


LETTERBOX_FILL = 114
ONNX_THREADS = 2


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """``img`` scaled to fit ``size`` = (h, w) with its aspect kept, centred on grey padding.

    Returns (image, scale, (pad_x, pad_y)): input pixel = frame pixel * scale + pad.
    """
    h, w = img.shape[:2]
    th, tw = size
    r = min(th / h, tw / w)
    nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    px, py = (tw - nw) // 2, (th - nh) // 2
    out = cv2.copyMakeBorder(resized, py, th - nh - py, px, tw - nw - px, cv2.BORDER_CONSTANT,
                             value=(LETTERBOX_FILL,) * 3)
    return out, r, (px, py)


def parse_yolo(raw: np.ndarray, layout: str = "auto", class_id: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """YOLO output -> (boxes (M, 4) as cx, cy, w, h; scores (M,)).

    ``layout``: yolov5 (1, N, 5+C), yolov8 (1, 4+C, N), or auto (the longer of the two axes is N).
    """
    a = np.asarray(raw, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a YOLO output of shape (1, N, 5+C) or (1, 4+C, N), got {tuple(np.shape(raw))}")
    if layout == "auto":
        layout = "yolov8" if a.shape[0] < a.shape[1] else "yolov5"
    if layout == "yolov8":
        a = a.T
        if a.shape[1] < 5:
            raise ValueError(f"yolov8 output needs 4 + classes >= 5 rows, got {a.shape[1]}")
        cls = a[:, 4:]
        obj = np.ones(len(a), np.float32)
    else:
        if a.shape[1] < 5:
            raise ValueError(f"yolov5 output needs 5 + classes >= 5 columns, got {a.shape[1]}")
        obj = a[:, 4]
        cls = a[:, 5:] if a.shape[1] > 5 else np.ones((len(a), 1), np.float32)
    if class_id is not None:
        if class_id >= cls.shape[1]:
            raise ValueError(f"onnx_class {class_id} but the model has {cls.shape[1]} class(es)")
        best = cls[:, class_id]
    else:
        best = cls.max(axis=1)
    return a[:, :4], obj * best


class OnnxDetector:
    """A YOLO-style ONNX model: best box per frame after score threshold and NMS."""

    def __init__(self, model: Path | str, score_threshold: float = 0.25, nms_iou: float = 0.45,
                 layout: str = "auto", class_id: int | None = None, threads: int = ONNX_THREADS):
        self.path = Path(model)
        if not self.path.is_file():
            raise DetectorUnavailable(f"{self.path}: ONNX model file not found (detect.onnx_model)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise DetectorUnavailable("detect.method onnx needs onnxruntime: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise DetectorUnavailable(f"{self.path}: not a usable ONNX model: {str(err).strip()[:300]}") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise DetectorUnavailable(f"{self.path}: expected an image input 1x3xHxW, got {inp.name} {shape}")
        self.input_name = inp.name
        self.size = tuple(d if isinstance(d, int) and d > 0 else 640 for d in shape[2:])
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.layout, self.class_id = layout, class_id

    def detect(self, frame: np.ndarray) -> tuple[Box, float] | None:
        """Best box (x0, y0, x1, y1; x1/y1 exclusive, frame pixels) and its score, or None."""
        found = self.detect_all(frame)
        return max(found, key=lambda f: f[1]) if found else None

    def detect_all(self, frame: np.ndarray) -> list[tuple[Box, float]]:
        """Every box kept after the score threshold and NMS (frame pixels), with its score."""
        img, r, (px, py) = letterbox(frame, self.size)
        x = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        try:
            raw = self.session.run(None, {self.input_name: x})[0]
            boxes, scores = parse_yolo(raw, self.layout, self.class_id)
        except ValueError as err:
            raise DetectorUnavailable(f"{self.path}: {err}") from None
        keep = scores >= self.score_threshold
        if not keep.any():
            return []
        boxes, scores = boxes[keep], scores[keep]
        xywh = np.column_stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 2], boxes[:, 3]])
        idx = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.score_threshold, self.nms_iou)).ravel()
        h, w = frame.shape[:2]
        out = []
        for k in idx:
            bx, by, bw, bh = xywh[int(k)]
            x0 = int(np.clip(np.floor((bx - px) / r), 0, w - 1))
            y0 = int(np.clip(np.floor((by - py) / r), 0, h - 1))
            x1 = int(np.clip(np.ceil((bx + bw - px) / r), x0 + 1, w))
            y1 = int(np.clip(np.ceil((by + bh - py) / r), y0 + 1, h))
            out.append(((x0, y0, x1, y1), float(scores[int(k)])))
        return out


def sample_video_frames(path: Path | str, n: int = PLATE_SAMPLES, with_index: bool = False) -> list:
    """About ``n`` frames spread evenly over the video (at most 2n); [] if it cannot be opened.

    ``with_index``: (frame index, frame) pairs.
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        return []
    frames: list = []
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        step = max(1, total // n) if total > 0 else 1
        i = 0
        while cap.grab():
            if i % step == 0:
                ok, frame = cap.retrieve()
                if ok:
                    frames.append((i, frame) if with_index else frame)
                if len(frames) >= 2 * n:        # length unknown or misreported: thin out
                    frames, step = frames[::2], step * 2
            i += 1
    finally:
        cap.release()
    return frames


def median_plate(frames: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of same-sized frames (the static background)."""
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"background frames differ in size: {sorted(shapes)}")
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def masked_median_plate(frames: list[np.ndarray], covers: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of same-sized frames over the ones whose ``covers`` (bool HxW) leave the
    pixel free; the plain median where every frame covers it."""
    stack = np.stack(frames)
    cov = np.stack(covers)
    cov[:, cov.all(axis=0)] = False
    keyed = stack.astype(np.uint16) + (cov[..., None].astype(np.uint16) << 8)   # covered sort last
    keyed.sort(axis=0)
    idx = np.maximum(((~cov).sum(axis=0) - 1) // 2, 0)
    med = np.take_along_axis(keyed, np.repeat(idx[None, ..., None], stack.shape[3], axis=3), axis=0)[0]
    return (med & 0xFF).astype(np.uint8)


def _track_covers(tracks_path: str, samples: list[tuple[int, np.ndarray]]) -> list[np.ndarray] | None:
    """Per sampled frame, the tracked product boxes (grown by TRACK_GROW) at the nearest logged frame."""
    try:
        log = pd.read_parquet(tracks_path)
    except (OSError, ValueError) as err:
        log.warning("%s: track log unreadable (%s); background plate from the plain median", tracks_path, err)
        return None
    if log.empty:
        return None
    logged = np.unique(log["frame_index"].to_numpy())
    by_frame = {f: g for f, g in log.groupby("frame_index")}
    covers = []
    for i, frame in samples:
        cover = np.zeros(frame.shape[:2], bool)
        f = int(logged[np.abs(logged - i).argmin()])
        if abs(f - i) <= 8:
            for b in by_frame[f].itertuples():
                gx, gy = TRACK_GROW * (b.x1 - b.x0), TRACK_GROW * (b.y1 - b.y0)
                cover[max(int(b.y0 - gy), 0):max(int(b.y1 + gy) + 1, 0), max(int(b.x0 - gx), 0):max(int(b.x1 + gx) + 1, 0)] = True
        covers.append(cover)
    return covers


def _plate_for_camera(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Background plate of one run + camera, and where it came from ('video' / 'frames')."""
    first = read_image(rows["image_path"].iloc[0])
    video = rows["video_path"].dropna().iloc[0]
    samples = sample_video_frames(video, with_index=True)
    frames = [f for _, f in samples]
    if len(frames) >= MIN_PLATE_FRAMES:
        tracks = rows["tracks_path"].dropna() if "tracks_path" in rows else pd.Series(dtype=str)
        covers = _track_covers(tracks.iloc[0], samples) if len(tracks) else None
        plate = masked_median_plate(frames, covers) if covers else median_plate(frames)
        if plate.shape != first.shape:
            plate = cv2.resize(plate, (first.shape[1], first.shape[0]), interpolation=cv2.INTER_AREA)
        return plate, "video"
    log.warning("%s: video not readable, background plate from the manifest's frames instead", video)
    ordered = rows.sort_values("frame_index", na_position="last")
    pick = np.unique(np.linspace(0, len(ordered) - 1, min(PLATE_SAMPLES, len(ordered))).round().astype(int))
    if len(pick) < MIN_PLATE_FRAMES:
        raise DetectError(f"{video}: cannot build a background plate: video unreadable and only "
                         f"{len(pick)} frame(s) of this camera in the manifest")
    frames = [read_image(p) for p in ordered["image_path"].iloc[pick]]
    try:
        return median_plate(frames), "frames"
    except ValueError as err:
        raise DetectError(f"{video}: cannot build a background plate from the manifest's frames: {err}") from None


def detect_box(frame: np.ndarray, plate: np.ndarray, diff_threshold: int) -> Box | None:
    """Box (x0, y0, x1, y1; x1/y1 exclusive) of the largest foreground blob, or None."""
    if frame.shape != plate.shape:
        raise ValueError(f"frame {frame.shape} and background plate {plate.shape} differ in size")
    h, w = frame.shape[:2]
    fg = (colour_diff(frame, plate) > diff_threshold).astype(np.uint8) * 255
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (odd(min(h, w) / 80),) * 2)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, k)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, k, iterations=2)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    biggest = max(contours, key=cv2.contourArea)
    x, y, bw, bh = cv2.boundingRect(biggest)
    if cv2.contourArea(biggest) < max(16.0, MIN_BLOB * h * w):
        return None
    return x, y, x + bw, y + bh


def refine_track_box(frame: np.ndarray, plate: np.ndarray, track: Box, diff_threshold: int) -> Box:
    """The foreground's box against ``plate`` within ``track`` grown by TRACK_GROW (no second search).

    A side where the foreground reaches the grown box's edge (a touching neighbour, or the frame's
    edge) stays at the track's edge; too little foreground inside: the track box itself.
    """
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in track)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    gx, gy = max(2, round(TRACK_GROW * (x1 - x0))), max(2, round(TRACK_GROW * (y1 - y0)))
    ex0, ey0, ex1, ey1 = max(x0 - gx, 0), max(y0 - gy, 0), min(x1 + gx, w), min(y1 + gy, h)
    fg = (colour_diff(frame[ey0:ey1, ex0:ex1], plate[ey0:ey1, ex0:ex1]) > diff_threshold).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, None)
    if cv2.countNonZero(fg) < TRACK_MIN_FILL * (x1 - x0) * (y1 - y0):
        return x0, y0, x1, y1
    cols, rows = np.nonzero(fg.any(axis=0))[0], np.nonzero(fg.any(axis=1))[0]
    fx0, fx1, fy0, fy1 = ex0 + cols[0], ex0 + cols[-1] + 1, ey0 + rows[0], ey0 + rows[-1] + 1
    return (int(x0 if fx0 == ex0 and ex0 > 0 else fx0), int(y0 if fy0 == ey0 and ey0 > 0 else fy0),
            int(x1 if fx1 == ex1 and ex1 < w else fx1), int(y1 if fy1 == ey1 and ey1 < h else fy1))


def _best_overlap(found: list[tuple[Box, float]], track: Box) -> tuple[Box, float] | None:
    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1)
    scored = [(iou(b, track), b, s) for b, s in found]
    best = max(scored, default=None)
    return None if best is None or best[0] <= 0 else (best[1], best[2])


def _crop_row(row: dict, frame: np.ndarray, plate: np.ndarray, bg_path: str,
              params: Params, out: StageOutput, onnx: OnnxDetector | None = None) -> dict | None:
    """Detect, crop and save one frame; the DETECT row, or None when nothing is in view."""
    track = None if any(pd.isna(row.get(c)) for c in TRACK_COLS) else tuple(int(row[c]) for c in TRACK_COLS)
    if onnx is not None:
        found = onnx.detect_all(frame) if track is not None else [f for f in [onnx.detect(frame)] if f]
        pick = _best_overlap(found, track) if track is not None else (found[0] if found else None)
        if pick is None:
            return None
        box, score = pick
    elif track is not None:
        box, score = refine_track_box(frame, plate, track, params.detect.diff_threshold), 1.0
    else:
        box, score = detect_box(frame, plate, params.detect.diff_threshold), 1.0
        if box is None:
            return None
    crop = crop_square(frame, square_box(box, params.detect.margin), params.detect.crop_size)
    tmp, recorded = out.path(f"crops/{safe_name(row['item_id'])}.png")
    write_image(tmp, crop)
    x0, y0, x1, y1 = box
    return {**row, "image_path": recorded, "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1,
            "detect_score": score, "background_path": bg_path}


def _unit_inputs(rows: list[dict]) -> list[str]:
    cols = ("image_path", "video_path", "tracks_path")
    return [r[c] for r in rows for c in cols if c in r and isinstance(r[c], str)]


def units(params: Params, df: pd.DataFrame) -> list[Unit]:
    """One unit per video (run, camera): its frames' rows (non-video rows are forwarded by ``run``)."""
    us = group_units("detect", df, _unit_inputs)
    if params.detect.method == "onnx" and params.detect.onnx_model:
        us = [Unit(u.name, u.payload, u.inputs + (str(params.detect.onnx_model),)) for u in us]
    return us


@functools.lru_cache(maxsize=2)
def _onnx_detector(model: str, score: float, iou: float, layout: str, cls: int | None) -> OnnxDetector:
    return OnnxDetector(model, score, iou, layout, cls)


def run_unit(params: Params, unit: Unit, out: StageOutput) -> UnitResult:
    """Background plate of one video, then the crop of each of its frames."""
    dp = params.detect
    onnx = (_onnx_detector(dp.onnx_model, dp.score_threshold, dp.nms_iou, dp.onnx_layout, dp.onnx_class)
            if dp.method == "onnx" else None)
    rows = unit.payload
    run_id, cam = rows[0]["run"], rows[0]["camera"]
    plate, origin = _plate_for_camera(pd.DataFrame(rows))
    tmp, bg_path = out.path(f"background/{safe_name(run_id)}_{safe_name(cam)}.png")
    write_image(tmp, plate)
    records, dropped, dropped_center = [], 0, 0
    for row in rows:
        frame = read_image(row["image_path"])
        if frame.shape != plate.shape:
            raise DetectError(f"{row['image_path']}: frame is {frame.shape}, but the background plate of "
                              f"{run_id}/{cam} is {plate.shape}")
        new = _crop_row(row, frame, plate, bg_path, params, out, onnx)
        if new is None:
            dropped += 1
            dropped_center += bool(row["is_center"])
            log.warning("%s: no %s, frame dropped", row["image_path"],
                        "box above detect.score_threshold" if onnx else "foreground against the background plate")
            continue
        records.append(new)
    return UnitResult(records, {"origin": origin, "dropped": dropped, "dropped_center": dropped_center})


def run(params: Params, inp: Path, out_dir: Path, mapper: Mapper | None = None) -> StageReport:
    """Detect and crop the product in every video frame of ``inp``'s manifest (a unit per video)."""
    df = read_manifest(manifest_path(inp), FRAMES)
    is_video = df["video_path"].notna()
    if not is_video.any():
        return skip_stage("detect", df, DETECT, inp, out_dir,
                          "images source: no video frames, images are used as they are")
    dp = params.detect
    onnx = (_onnx_detector(dp.onnx_model, dp.score_threshold, dp.nms_iou, dp.onnx_layout, dp.onnx_class)
            if dp.method == "onnx" else None)
    with stage_run("detect", out_dir) as (out, report):
        video_df = df.assign(**{POS: range(len(df))})[is_video]
        settings = {"detect": dp.model_dump(mode="json")}
        outcomes = map_units("detect", params, _positioned_units(params, video_df), run_unit, out, settings,
                             report, mapper)
        forwarded = [{**r, POS: i} for i, r in enumerate(df.to_dict("records")) if not isinstance(r["video_path"], str)]
        records = merge_rows([*outcomes, UnitOutcome("forwarded", UnitResult(forwarded))])
        stats = [r.stats for r in results(outcomes)]
        origins = {k: sum(s["origin"] == k for s in stats) for k in ("video", "frames")}
        dropped, dropped_center = sum(s["dropped"] for s in stats), sum(s["dropped_center"] for s in stats)
        out_df = pd.DataFrame(records, columns=DETECT.names)
        write_manifest(out_df, DETECT, out.manifest,
                       meta={"detector": dp.method, **({"onnx_model": str(dp.onnx_model)} if onnx else {}),
                             **quarantine_meta(outcomes)})
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
        report.notes.append(f"background plates: {origins['video']} from videos, "
                            f"{origins['frames']} from manifest frames")
        report.notes.append(f"detector: {dp.method}" + (f" ({dp.onnx_model}, input {onnx.size})" if onnx else ""))
        report.notes.append(f"{dropped} frame(s) with no foreground dropped ({dropped_center} of them centre frames)")
        if (~is_video).any():
            report.notes.append(f"{int((~is_video).sum())} non-video row(s) forwarded without detection")
    return report


def _positioned_units(params: Params, video_df: pd.DataFrame) -> list[Unit]:
    """``units`` of the video rows, each row keeping its position in the whole manifest."""
    us = units(params, video_df.drop(columns=[POS]))
    pos = video_df[POS].tolist()
    return [Unit(u.name, [{**r, POS: pos[r[POS]]} for r in u.payload], u.inputs) for u in us]
