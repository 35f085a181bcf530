"""Decode one video once, front to back, and track its products (the frames stage's work per video).

``scan_video`` opens the file (MJPG through the JPEG passthrough when ``frames.jpeg_passthrough``: motion on a
reduced JPEG decode, kept frames as the video's own JPEG bytes), builds the camera's lanes and a
``VideoTracker`` and feeds it every frame; each counted product is handed to ``on_capture`` with its frames.
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from defectflow.config import FramesParams
from defectflow.sources.videos import VideoReadError
from defectflow.tracking.lanes import WORK_WIDTH, Grid, lanes_for_camera
from defectflow.tracking.scan import VideoTracker
from defectflow.tracking.tracker import Capture
from defectflow.video_decode import JpegStream, Payload, VideoScan, decoded_frames

PROGRESS_EVERY = 500        # frames between progress-bar updates


def scan_video(path: Path | str, fp: FramesParams, on_capture: Callable[[Capture, VideoScan], None],
               camera: str = "cam0") -> tuple[VideoScan, VideoTracker | None]:
    """Decode ``path`` once, calling ``on_capture(capture, scan)`` for each counted product (with its frames).

    A capture's frames are BGR arrays, or JPEG bytes when the MJPG passthrough was used
    (``scan.jpeg``). Raises VideoReadError when the file cannot be opened; a truncated or
    undecodable stream is reported in ``VideoScan.problem`` (the captures seen so far have been
    handed on). Returns the scan and the video's tracker (track log, plate; None without frames).
    """
    jpeg = JpegStream.open(path) if fp.jpeg_passthrough else None
    cap = jpeg.cap if jpeg else cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError(f"{path}: cannot open the video (unreadable, corrupt or not a video file)")
    scan = VideoScan(str(path), cap.get(cv2.CAP_PROP_FPS) or 0.0, max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0),
                     jpeg=jpeg is not None)
    vt = None
    try:
        if jpeg:
            shape = jpeg.shape
            stream = ((t, pkt, pkt) for t, pkt in jpeg.packets(scan))
        else:
            frames = decoded_frames(cap, scan)
            first = next(frames, None)
            shape = first[1].shape if first is not None else None
            stream = ((t, f, f) for t, f in chain([first], frames)) if first is not None else iter(())
        if shape is not None:
            lanes = lanes_for_camera(fp, camera, shape[1], shape[0])
            reduce = 1
            if jpeg:
                xs = np.vstack([ln.polygon for ln in lanes])[:, 0]
                jpeg.set_reduce(float(np.ptp(xs)), WORK_WIDTH)
                reduce = jpeg.reduce
            grid = Grid(lanes, shape, reduce)
            vt = VideoTracker(lanes, grid, fp)
            _track_stream(stream, jpeg, grid, vt, scan, on_capture)
    finally:
        cap.release()
    scan.finish()
    return scan, vt


def _track_stream(stream, jpeg: JpegStream | None, grid: Grid, vt: VideoTracker, scan: VideoScan,
                  on_capture) -> None:
    bar = tqdm(total=scan.expected or None, desc=Path(scan.path).name, unit="frame", disable=None, leave=False)
    try:
        for t, raw, decodable in stream:
            small = None
            if vt.wants(t):
                img = jpeg.grey(decodable) if jpeg else decodable
                if img is None:
                    scan.bad_frame = t
                    break
                small = grid.small(img)
            payload: Payload = raw.tobytes() if jpeg else raw
            for c in vt.feed(t, payload, small):
                on_capture(c, scan)
            if t % PROGRESS_EVERY == 0 and t:
                bar.update(PROGRESS_EVERY)
        for c in vt.flush():
            on_capture(c, scan)
    finally:
        bar.close()
    scan.n_tracks, scan.n_dropped = vt.n_tracks, vt.n_rejected
