"""Stage detect (FRAMES -> DETECT): find the product in each video frame and crop it.

Classical detector: per run + camera a background plate, the per-pixel median of
frames sampled evenly over that camera's whole video (moving products vanish, the
empty belt is left). The frames in the manifest alone would not do: they are the
window around each pass's centre, so the product covers the view centre in nearly
all of them; they are only the fallback when the video cannot be read. Then per
frame: difference from the plate -> threshold -> morphology -> largest external
contour -> box (x1/y1 exclusive, frame pixels). The crop is a square re-centred on
the box with ``detect.margin`` of its longer side added on each side (black where
it leaves the frame), resized to ``detect.crop_size``. Image sources (no video)
skip the stage.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.fsutil import read_image, write_image
from defectflow.imgops import colour_diff, crop_square, odd, safe_name, square_box
from defectflow.manifest import DETECT, FRAMES, read_manifest, write_manifest
from defectflow.stage import skip_stage
from defectflow.stage import StageOutput, StageReport, logger, manifest_path, stage_run

log = logger("detect")

PLATE_SAMPLES = 25      # frames per video used for the background median
MIN_PLATE_FRAMES = 3    # fewer than this and the median is not a background
MIN_BLOB = 0.0005       # smallest foreground blob, fraction of the frame area (at least 16 px)

Box = tuple[int, int, int, int]


class DetectError(DefectflowError):
    """A camera's frames cannot be detected in (no background plate, sizes differ)."""


class DetectorUnavailable(DefectflowError):
    """The chosen detector is not implemented yet."""


def sample_video_frames(path: Path | str, n: int = PLATE_SAMPLES) -> list[np.ndarray]:
    """About ``n`` frames spread evenly over the video (at most 2n); [] if it cannot be opened."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        return []
    frames: list[np.ndarray] = []
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        step = max(1, total // n) if total > 0 else 1
        i = 0
        while cap.grab():
            if i % step == 0:
                ok, frame = cap.retrieve()
                if ok:
                    frames.append(frame)
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


def _plate_for_camera(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Background plate of one run + camera, and where it came from ('video' / 'frames')."""
    first = read_image(rows["image_path"].iloc[0])
    video = rows["video_path"].dropna().iloc[0]
    frames = sample_video_frames(video)
    if len(frames) >= MIN_PLATE_FRAMES:
        plate = median_plate(frames)
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


def _crop_row(row: dict, frame: np.ndarray, plate: np.ndarray, bg_path: str,
              params: Params, out: StageOutput) -> dict | None:
    """Detect, crop and save one frame; the DETECT row, or None when nothing is in view."""
    box = detect_box(frame, plate, params.detect.diff_threshold)
    if box is None:
        return None
    crop = crop_square(frame, square_box(box, params.detect.margin), params.detect.crop_size)
    tmp, recorded = out.path(f"crops/{safe_name(row['item_id'])}.png")
    write_image(tmp, crop)
    x0, y0, x1, y1 = box
    return {**row, "image_path": recorded, "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1,
            "detect_score": 1.0, "background_path": bg_path}


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Detect and crop the product in every video frame of ``inp``'s manifest."""
    df = read_manifest(manifest_path(inp), FRAMES)
    is_video = df["video_path"].notna()
    if not is_video.any():
        return skip_stage("detect", df, DETECT, inp, out_dir,
                          "images source: no video frames, images are used as they are")
    if params.detect.method == "onnx":
        raise DetectorUnavailable("detect.method=onnx: the onnx detector arrives with issue 3; "
                                  "use detect.method: classical for now")
    with stage_run("detect", out_dir) as (out, report):
        plates: dict[tuple[str, str], tuple[np.ndarray, str]] = {}
        origins = {"video": 0, "frames": 0}
        for (run_id, cam), rows in df[is_video].groupby(["run", "camera"], sort=False):
            plate, origin = _plate_for_camera(rows)
            tmp, recorded = out.path(f"background/{safe_name(run_id)}_{safe_name(cam)}.png")
            write_image(tmp, plate)
            plates[(run_id, cam)] = (plate, recorded)
            origins[origin] += 1
        records, dropped, dropped_center = [], 0, 0
        for row in tqdm(df.to_dict("records"), desc="detect", unit="frame", disable=None, leave=False):
            if pd.isna(row["video_path"]):
                records.append(row)
                continue
            plate, bg_path = plates[(row["run"], row["camera"])]
            frame = read_image(row["image_path"])
            if frame.shape != plate.shape:
                raise DetectError(f"{row['image_path']}: frame is {frame.shape}, but the background plate of "
                                  f"{row['run']}/{row['camera']} is {plate.shape}")
            new = _crop_row(row, frame, plate, bg_path, params, out)
            if new is None:
                dropped += 1
                dropped_center += bool(row["is_center"])
                log.warning("%s: no foreground against the background plate, frame dropped", row["image_path"])
                continue
            records.append(new)
        out_df = pd.DataFrame(records, columns=DETECT.names)
        write_manifest(out_df, DETECT, out.manifest, meta={"detector": "classical"})
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
        report.notes.append(f"background plates: {origins['video']} from videos, "
                            f"{origins['frames']} from manifest frames")
        report.notes.append(f"{dropped} frame(s) with no foreground dropped ({dropped_center} of them centre frames)")
        if (~is_video).any():
            report.notes.append(f"{int((~is_video).sum())} non-video row(s) forwarded without detection")
    return report
