"""Annotated output videos: each product boxed and labelled with its track id and verdict.

For every source video with scored products, each product's box is drawn while it is
in view -- red when this camera flags it, orange when another camera flags the product,
green when the product passes -- with its track id, product id and score. Where the
frames stage logged the video's tracks (``tracks_path``) every track is drawn from the
log at every frame (between tracked frames the box is interpolated; tracks that were not
counted are grey, id only); otherwise boxes between and around the kept window frames
are extrapolated along the product's straight-line motion on the belt.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.stage import logger

log = logger("evaluate")
RED, ORANGE, GREEN, GREY = (40, 40, 230), (0, 150, 255), (60, 180, 60), (150, 150, 150)
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


def logged_tracks(log: pd.DataFrame) -> dict[tuple[str, int], dict[int, tuple[int, int, int, int]]]:
    """(lane, track id) -> frame index -> box, from a frames-stage track log, interpolated between tracked frames."""
    out = {}
    for (lane, tid), g in log.groupby(["lane", "track_id"], sort=False):
        g = g.sort_values("frame_index")
        f = g["frame_index"].to_numpy()
        frames = np.arange(int(f.min()), int(f.max()) + 1)
        cols = [np.interp(frames, f, g[c].to_numpy(float)) for c in ("x0", "y0", "x1", "y1")]
        out[(str(lane), int(tid))] = {int(k): tuple(int(round(c[i])) for c in cols) for i, k in enumerate(frames)}
    return out


def _label(frame: np.ndarray, box, colour, text: str) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(frame, (x0, y0), (x1, y1), colour, 2)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    ty = max(th + 4, y0)
    cv2.rectangle(frame, (x0, ty - th - 4), (x0 + tw + 4, ty), colour, -1)
    cv2.putText(frame, text, (x0 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


class Mp4Writer:
    """H.264 MP4 (``yuv420p``, the profile every browser plays) through PyAV's bundled FFmpeg.

    Frames are BGR uint8; odd widths/heights are padded by one pixel (4:2:0 needs even sizes)."""

    def __init__(self, path: Path, fps: float, crf: int = 26):
        import av
        from fractions import Fraction

        self.path = Path(path)
        self._container = av.open(str(path), mode="w", options={"movflags": "+faststart"})
        self._rate = Fraction(fps).limit_denominator(1000)
        self._crf = crf
        self._stream = None
        self.frames = 0

    def write(self, frame_bgr: np.ndarray) -> None:
        import av

        h, w = frame_bgr.shape[:2]
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self._rate)
            self._stream.width, self._stream.height = w + w % 2, h + h % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self._crf), "preset": "veryfast"}
        if w % 2 or h % 2:
            frame_bgr = cv2.copyMakeBorder(frame_bgr, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_bgr), format="bgr24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        self._container.close()


def annotate_video(video: Path, out: Path, passes: list[tuple[dict, str, tuple]]) -> int:
    """Write ``video`` to ``out`` (H.264 MP4) with ``passes`` = [(track, text, colour)] drawn; returns frames."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f"{video}: cannot open video to annotate")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = Mp4Writer(out, fps)
    n = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            for track, text, colour in passes:
                if n in track:
                    _label(frame, track[n], colour, text)
            writer.write(frame)
            n += 1
    finally:
        cap.release()
        writer.close()
    if n == 0:
        out.unlink(missing_ok=True)
        raise ValueError(f"{video}: no frame could be read to annotate")
    return n


def poster_frame(video: Path, index: int | None = None) -> np.ndarray | None:
    """One BGR frame of ``video`` (the middle one by default) for the PDF; None when unreadable."""
    cap = cv2.VideoCapture(str(video))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        cap.set(cv2.CAP_PROP_POS_FRAMES, n // 2 if index is None else index)
        ok, frame = cap.read()
    finally:
        cap.release()
    return frame if ok else None


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
        labelled, windows = {}, {}
        for (product, camera), prow in rows.groupby(["product_id", "camera"]):
            if (product, camera) not in cam_score.index:
                continue
            score = float(cam_score[(product, camera)])
            flagged = score >= threshold
            other = product_verdict.get(product) == "defect"
            colour = RED if flagged else ORANGE if other else GREEN
            verdict = "DEFECT" if flagged else "defect (other cam)" if other else "good"
            labelled[product] = (f"{product} {verdict} {score:.2f}", colour)
            windows[product] = prow
        if not labelled:
            continue
        logged = rows["tracks_path"].dropna() if "tracks_path" in rows else pd.Series(dtype=str)
        if len(logged) and Path(logged.iloc[0]).is_file():
            passes = _track_passes(pd.read_parquet(logged.iloc[0]), rows, labelled)
        else:
            passes = [(pass_tracks(windows[p]), *labelled[p]) for p in labelled]
        out = out_dir / f"{Path(video).stem}.mp4"
        n = annotate_video(Path(video), out, passes)
        log.info("evaluate: annotated %s (%d frames, %d products) -> %s", video, n, len(labelled), out)
        written.append(out)
    return written


def _track_passes(track_log: pd.DataFrame, rows: pd.DataFrame, labelled: dict) -> list[tuple[dict, str, tuple]]:
    """Every logged track with its id: scored products in their verdict colour, the others grey."""
    product_of = {}
    if {"lane", "track_id"} <= set(rows.columns):
        for r in rows.dropna(subset=["track_id"]).itertuples():
            product_of[(str(r.lane), int(r.track_id))] = r.product_id
    passes = []
    for key, track in logged_tracks(track_log).items():
        product = product_of.get(key)
        text, colour = labelled.get(product, (product or "not counted", GREY))
        passes.append((track, f"#{key[1]} {text}", colour))
    return passes
