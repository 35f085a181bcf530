"""Annotated output videos: each product pass boxed and labelled with its verdict.

For every source video with scored products, the product's box (from detect) is
drawn while it crosses the view -- red when this camera flags it, orange when
another camera flags the product, green when the product passes -- with its score.
Boxes between and around the kept window frames are extrapolated along the
product's straight-line motion on the belt.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.stage import logger

log = logger("evaluate")
RED, ORANGE, GREEN = (40, 40, 230), (0, 150, 255), (60, 180, 60)
EXTEND_FRAMES = 10  # frames before and after the kept window that still get a box


def pass_tracks(rows: pd.DataFrame, extend: int = EXTEND_FRAMES) -> dict[int, tuple[int, int, int, int]]:
    """Frame index -> box (x0, y0, x1, y1) for one product pass, fitted to its window frames."""
    rows = rows.dropna(subset=["frame_index", "box_x0"]).sort_values("frame_index")
    if rows.empty:
        return {}
    f = rows["frame_index"].to_numpy(float)
    cx = ((rows["box_x0"] + rows["box_x1"]) / 2).to_numpy(float)
    cy = ((rows["box_y0"] + rows["box_y1"]) / 2).to_numpy(float)
    w = float(np.median(rows["box_x1"] - rows["box_x0"]))
    h = float(np.median(rows["box_y1"] - rows["box_y0"]))
    if len(f) > 1 and np.ptp(f) > 0:
        fit_x, fit_y = np.polyfit(f, cx, 1), np.polyfit(f, cy, 1)
    else:
        fit_x, fit_y = np.array([0.0, cx[0]]), np.array([0.0, cy[0]])
    track = {}
    for k in range(int(f.min()) - extend, int(f.max()) + extend + 1):
        x, y = np.polyval(fit_x, k), np.polyval(fit_y, k)
        track[k] = (int(round(x - w / 2)), int(round(y - h / 2)), int(round(x + w / 2)), int(round(y + h / 2)))
    return track


def _label(frame: np.ndarray, box, colour, text: str) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(frame, (x0, y0), (x1, y1), colour, 2)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    ty = max(th + 4, y0)
    cv2.rectangle(frame, (x0, ty - th - 4), (x0 + tw + 4, ty), colour, -1)
    cv2.putText(frame, text, (x0 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def annotate_video(video: Path, out: Path, passes: list[tuple[dict, str, tuple]]) -> int:
    """Write ``video`` to ``out`` (MJPG) with ``passes`` = [(track, text, colour)] drawn; returns frames."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f"{video}: cannot open video to annotate")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    n = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
            for track, text, colour in passes:
                if n in track:
                    _label(frame, track[n], colour, text)
            writer.write(frame)
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    return n


def annotate_videos(window_rows: pd.DataFrame, scored: pd.DataFrame, verdicts: pd.DataFrame,
                    threshold: float, out_dir: Path) -> list[Path]:
    """One annotated copy of every source video that has scored products; returns the files."""
    if "video_path" not in window_rows or window_rows["video_path"].isna().all() or scored.empty:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_score = scored.groupby(["product_id", "camera"])["score"].max()
    product_verdict = verdicts.set_index("product_id")["verdict"]
    written = []
    for video, rows in window_rows.dropna(subset=["video_path"]).groupby("video_path"):
        passes = []
        for (product, camera), prow in rows.groupby(["product_id", "camera"]):
            if (product, camera) not in cam_score.index:
                continue
            score = float(cam_score[(product, camera)])
            flagged = score >= threshold
            other = product_verdict.get(product) == "defect"
            colour = RED if flagged else ORANGE if other else GREEN
            verdict = "DEFECT" if flagged else "defect (other cam)" if other else "good"
            passes.append((pass_tracks(prow), f"{product} {verdict} {score:.2f}", colour))
        if passes:
            out = out_dir / f"{Path(video).stem}.avi"
            n = annotate_video(Path(video), out, passes)
            log.info("evaluate: annotated %s (%d frames, %d products) -> %s", video, n, len(passes), out)
            written.append(out)
    return written
