"""Frames stage: cut each video into product passes and keep the frames around the view centre.

For each video (one camera of one run) motion is measured on a downscaled grey copy of each
frame against a running background (started from the median of the first frames). A pass is a
run of frames whose largest moving blob covers at least ``frames.min_area`` of the watched
region, lasting at least ``frames.min_pass_frames`` frames (gaps of up to ``MAX_GAP`` frames
are bridged). Its centre frame is the one whose blob centroid is nearest the region's
horizontal centre; ``frames.window`` frames around it are written as PNG.

The video is decoded once, front to back; only a small ring buffer of full frames and the
window of each open pass are held in memory.

For the ``images`` source there is no video: the items are forwarded (``is_center`` true).
"""
from __future__ import annotations

import json
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import FramesParams, Params
from defectflow.fsutil import write_image
from defectflow.manifest import FRAMES, write_manifest
from defectflow.sources.videos import VideoReadError, VideoSourceError, camera_label, load_passes, load_videos
from defectflow.stage import StageOutput, StageReport, logger, stage_run

MAX_GAP = 2                  # frames a pass may lose its blob and still go on
WORK_WIDTH = 160             # motion is measured on frames downscaled to at most this width
BG_FRAMES = 40               # the background starts as the median of this many first frames
BG_RATE = 0.05               # running background update where nothing moves
BG_BUFFER_BYTES = 64 << 20   # cap on full frames held while the background starts

log = logger("frames")


# ----------------------------------------------------------------------------- motion

class MotionDetector:
    """Largest moving blob of a frame against a running background, inside ``region``."""

    def __init__(self, frame_shape: tuple[int, ...], fp: FramesParams):
        h, w = frame_shape[:2]
        rx0, ry0, rx1, ry1 = fp.region or (0.0, 0.0, 1.0, 1.0)
        self.x0, self.y0 = int(rx0 * w), int(ry0 * h)
        self.x1, self.y1 = max(int(math.ceil(rx1 * w)), self.x0 + 1), max(int(math.ceil(ry1 * h)), self.y0 + 1)
        self.scale = min(1.0, WORK_WIDTH / (self.x1 - self.x0))
        self.size = (max(1, round((self.x1 - self.x0) * self.scale)), max(1, round((self.y1 - self.y0) * self.scale)))
        self.center_x = (self.x0 + self.x1) / 2
        self.threshold = float(fp.motion_threshold)
        self.min_px = fp.min_area * self.size[0] * self.size[1]
        self.bg: np.ndarray | None = None
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))

    def small(self, frame: np.ndarray) -> np.ndarray:
        """Grey, downscaled float32 copy of the watched region (area averaging also tames noise)."""
        roi = cv2.resize(frame[self.y0:self.y1, self.x0:self.x1], self.size, interpolation=cv2.INTER_AREA)
        return (cv2.cvtColor(roi, cv2.COLOR_BGR2GRAY) if roi.ndim == 3 else roi).astype(np.float32)

    def start(self, smalls: list[np.ndarray]) -> None:
        self.bg = np.median(np.stack(smalls), axis=0).astype(np.float32)

    def offset(self, small: np.ndarray) -> float | None:
        """|blob centroid x - view centre| in frame pixels, or None when no blob is big enough.

        Also updates the background where nothing moves.
        """
        moving = (cv2.absdiff(small, self.bg) > self.threshold).astype(np.uint8)
        if cv2.countNonZero(moving) >= self.min_px:
            moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, None)
            moving = cv2.morphologyEx(moving, cv2.MORPH_CLOSE, self._kernel)
        cv2.accumulateWeighted(small, self.bg, BG_RATE, mask=1 - moving)
        if cv2.countNonZero(moving) < self.min_px:
            return None
        contours, _ = cv2.findContours(moving, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        m = max((cv2.moments(c) for c in contours), key=lambda mo: mo["m00"])
        if m["m00"] < self.min_px:
            return None
        return abs(self.x0 + m["m10"] / m["m00"] / self.scale - self.center_x)


# ----------------------------------------------------------------------------- passes

@dataclass
class Pass:
    """A product crossing the view: frames ``start..end`` with a blob, ``center`` nearest the centre."""

    start: int
    end: int
    n_seen: int = 0
    center: int = -1
    dist: float = math.inf
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    index: int = -1


class PassTracker:
    """Groups per-frame blobs into passes and keeps the window of full frames around each centre."""

    def __init__(self, window: int, min_frames: int, max_gap: int = MAX_GAP):
        self.before, self.after = (window - 1) // 2, window // 2
        self.min_frames, self.max_gap = min_frames, max_gap
        self.ring: deque[tuple[int, np.ndarray]] = deque(maxlen=self.before + 1)
        self.active: Pass | None = None
        self.pending: list[Pass] = []
        self.n_passes = 0

    def feed(self, t: int, frame: np.ndarray, dist: float | None) -> list[Pass]:
        """Add frame ``t`` (``dist``: blob offset from the centre, None: no blob); return finished passes."""
        self.ring.append((t, frame))
        if self.active is not None and t - self.active.end > self.max_gap:
            self._close()
        if dist is not None:
            p = self.active = self.active or Pass(start=t, end=t)
            p.end, p.n_seen = t, p.n_seen + 1
            if dist < p.dist:
                p.dist, p.center = dist, t
                p.frames = {i: f for i, f in self.ring if i >= t - self.before}
        for p in chain([self.active] if self.active else [], self.pending):
            if p.center < t <= p.center + self.after:
                p.frames[t] = frame
        done = [p for p in self.pending if t >= p.center + self.after]
        self.pending = [p for p in self.pending if t < p.center + self.after]
        return done

    def flush(self) -> list[Pass]:
        """End of video: close the open pass and return every pass still waiting for frames."""
        self._close()
        done, self.pending = self.pending, []
        return done

    def _close(self) -> None:
        p, self.active = self.active, None
        if p is not None and p.n_seen >= self.min_frames:
            p.index, self.n_passes = self.n_passes, self.n_passes + 1
            self.pending.append(p)


# ----------------------------------------------------------------------------- one video

@dataclass
class VideoScan:
    """What reading one video gave."""

    path: str
    fps: float
    expected: int          # frame count from the container (0: unknown)
    n_read: int = 0
    n_passes: int = 0
    problem: str | None = None


def _decode(cap: cv2.VideoCapture, scan: VideoScan) -> Iterator[tuple[int, np.ndarray]]:
    """Frames of ``cap`` in order; a decoder error ends the stream and is recorded in ``scan``."""
    while True:
        try:
            ok, frame = cap.read()
        except cv2.error as err:
            scan.problem = f"decode error after frame {scan.n_read}: {str(err).strip()}"
            return
        if not ok or frame is None:
            return
        yield scan.n_read, frame
        scan.n_read += 1


def _with_smalls(first, frames: Iterator, detector: MotionDetector) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index, frame, small grey) for every frame; starts the detector's background on the first
    frames (held briefly, at most BG_BUFFER_BYTES) before handing them on."""
    n_start = max(1, min(BG_FRAMES, BG_BUFFER_BYTES // max(first[1].nbytes, 1)))
    buf = deque([first])
    buf.extend(f for _, f in zip(range(n_start - 1), frames))
    smalls = deque(detector.small(f) for _, f in buf)
    detector.start(list(smalls))
    while buf:
        t, img = buf.popleft()
        yield t, img, smalls.popleft()
    for t, img in frames:
        yield t, img, detector.small(img)


def scan_video(path: Path | str, fp: FramesParams, on_pass: Callable[[Pass, VideoScan], None]) -> VideoScan:
    """Decode ``path`` once, calling ``on_pass(pass, scan)`` for each product pass (with its frames).

    Raises VideoReadError when the file cannot be opened; a truncated or undecodable stream is
    reported in ``VideoScan.problem`` (the passes seen so far have been handed on).
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError(f"{path}: cannot open the video (unreadable, corrupt or not a video file)")
    scan = VideoScan(str(path), cap.get(cv2.CAP_PROP_FPS) or 0.0, max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0))
    try:
        frames = _decode(cap, scan)
        first = next(frames, None)
        if first is not None:
            detector = MotionDetector(first[1].shape, fp)
            tracker = PassTracker(fp.window, fp.min_pass_frames)
            for t, img, small in _with_smalls(first, frames, detector):
                for p in tracker.feed(t, img, detector.offset(small)):
                    on_pass(p, scan)
            for p in tracker.flush():
                on_pass(p, scan)
            scan.n_passes = tracker.n_passes
    finally:
        cap.release()
    if scan.problem is None:
        if scan.n_read == 0:
            scan.problem = "no frame could be decoded"
        elif scan.expected and scan.n_read < scan.expected - max(1, scan.expected // 100):
            scan.problem = f"truncated: decoded {scan.n_read} of {scan.expected} frames"
    return scan


# ----------------------------------------------------------------------------- stage

class _Products:
    """Product id, split and camera label of pass k of a run: from passes.csv, else from the video row."""

    def __init__(self, passes: pd.DataFrame | None):
        self.rows = {} if passes is None else {(r["run"], int(r["pass_index"])): r for r in passes.to_dict("records")}
        self.has_table = passes is not None
        self.unlisted: list[str] = []

    def info(self, video, k: int) -> dict:
        row = self.rows.get((video.run, k))
        if row is None:
            if self.has_table:
                self.unlisted.append(f"{video.run} pass {k}")
            return {"product_id": f"{video.run}-p{k:03d}", "split": video.split,
                    "label": video.label or "unknown", "defect_type": None}
        label, defect_type = camera_label(row, video.camera)
        return {"product_id": row["product_id"], "split": row["split"], "label": label, "defect_type": defect_type}

    def expected(self, run: str) -> int | None:
        return sum(r == run for r, _ in self.rows) if self.has_table else None


class _Writer:
    """Writes PNGs on a background thread (encoding overlaps decoding); at most ``limit`` queued."""

    def __init__(self, limit: int = 64):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frames-png")
        self.queue: deque[Future] = deque()
        self.limit = limit

    def write(self, path: Path, img: np.ndarray) -> None:
        while len(self.queue) >= self.limit:
            self.queue.popleft().result()
        self.queue.append(self.pool.submit(write_image, path, img, atomic=False))

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            while self.queue:
                self.queue.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _pass_rows(p: Pass, video, scan: VideoScan, products: _Products, out: StageOutput, source: str,
               writer: _Writer) -> list[dict]:
    """Queue the pass's frames as PNG and return their FRAMES rows."""
    base = {"run": video.run, "camera": video.camera, "source": source, "video_path": video.path,
            "pass_index": p.index, "gt_mask_path": None, **products.info(video, p.index)}
    rows = []
    for i in sorted(p.frames):
        item_id = f"{video.run}_{video.camera}_p{p.index:03d}_f{i:05d}"
        tmp, recorded = out.path(f"frames/{video.run}_{video.camera}/{item_id}.png")
        writer.write(tmp, p.frames[i])
        rows.append({**base, "item_id": item_id, "image_path": recorded, "frame_index": i,
                     "is_center": i == p.center, "t_sec": i / scan.fps if scan.fps > 0 else None})
    return rows


def _check_demo(params: Params, inp: Path) -> None:
    """The demo source needs its videos generated first (the stage writes nothing outside out_dir)."""
    if params.source.kind == "demo" and not (inp / "videos.csv").exists():
        raise VideoSourceError(f"{inp}: no demo videos here (videos.csv not found); generate them first "
                               f"with `python -m defectflow.cli demo` (make demo)")


def _run_images(params: Params, inp: Path, out: StageOutput, report: StageReport) -> None:
    from defectflow.sources.images import load_items
    reason = "images source: no video to decode"
    df = load_items(params).copy()
    df["is_center"] = True
    write_manifest(df, FRAMES, out.manifest, meta={"skipped": reason, "source": "images"})
    report.read.append(str(inp))
    report.n_in = report.n_out = len(df)
    report.notes.append(f"{reason}; forwarded {len(df)} images (is_center true)")


@dataclass
class _Scans:
    """What the videos gave: manifest rows, per-video scans, bad and pass-less videos."""

    rows: list[dict] = field(default_factory=list)
    scans: list[VideoScan] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def _scan_one(video, fp: FramesParams, on_pass, acc: _Scans) -> None:
    """Scan one video into ``acc``; bad videos raise (on_bad_video: error) or are recorded (warn)."""
    try:
        scan = scan_video(video.path, fp, on_pass)
    except VideoReadError as err:
        if fp.on_bad_video == "error":
            raise
        acc.bad.append({"video": video.path, "problem": str(err), "frames_read": 0})
        log.warning("frames: %s (skipped: frames.on_bad_video is warn)", err)
        return
    acc.scans.append(scan)
    if scan.problem:
        if fp.on_bad_video == "error":
            raise VideoReadError(f"{video.path}: {scan.problem} (set frames.on_bad_video: warn to keep what was read)")
        acc.bad.append({"video": video.path, "problem": scan.problem, "frames_read": scan.n_read})
        log.warning("frames: %s: %s; kept the %d pass(es) read so far", video.path, scan.problem, scan.n_passes)
    if scan.n_passes == 0:
        acc.empty.append(video.path)
        log.warning("frames: %s: no product pass found (%d frames read)", video.path, scan.n_read)


def _run_videos(params: Params, inp: Path, out: StageOutput, report: StageReport) -> None:
    fp, source = params.frames, params.source.kind
    _check_demo(params, inp)
    videos = load_videos(inp)
    products = _Products(load_passes(inp))
    acc, writer = _Scans(), _Writer()
    try:
        for video in tqdm(list(videos.itertuples(index=False)), desc="frames", unit="video"):
            def on_pass(p: Pass, scan: VideoScan, video=video) -> None:
                acc.rows.extend(_pass_rows(p, video, scan, products, out, source, writer))
            _scan_one(video, fp, on_pass, acc)
    finally:
        writer.close()
    df = pd.DataFrame(acc.rows, columns=FRAMES.names)
    _check_counts(videos, acc.scans, products, report)
    meta = {"source": source, "videos": len(videos), "passes": sum(s.n_passes for s in acc.scans),
            "frames_decoded": sum(s.n_read for s in acc.scans), "window": fp.window,
            "bad_videos": json.dumps(acc.bad), "videos_without_passes": json.dumps(acc.empty)}
    write_manifest(df, FRAMES, out.manifest, meta=meta)
    report.read.append(f"{inp} ({len(videos)} videos, {meta['frames_decoded']} frames decoded)")
    report.n_in, report.n_out = len(videos), len(df)
    report.notes.append(f"{meta['passes']} product passes, {len(df)} frames written "
                        f"({int(df['is_center'].sum())} centre frames)")
    report.notes += [f"bad video, kept what was read: {b['video']}: {b['problem']}" for b in acc.bad]
    if acc.empty:
        report.notes.append(f"{len(acc.empty)} video(s) without a product pass: {', '.join(acc.empty)}")


def _check_counts(videos: pd.DataFrame, scans: list[VideoScan], products: _Products, report: StageReport) -> None:
    """Warn when the cameras of a run disagree on the number of passes, or disagree with passes.csv."""
    found = {s.path: s.n_passes for s in scans}
    for run, group in videos.groupby("run", sort=False):
        counts = {cam: found[p] for cam, p in zip(group["camera"], group["path"]) if p in found}
        expected = products.expected(run)
        if len(set(counts.values())) > 1 or (expected is not None and any(c != expected for c in counts.values())):
            msg = f"run {run}: passes found per camera {counts}" + (
                f", passes.csv lists {expected}" if expected is not None else "")
            log.warning("frames: %s", msg)
            report.notes.append(msg)
    if products.unlisted:
        msg = f"{len(products.unlisted)} pass(es) not in passes.csv (ids from the run name): {products.unlisted[:5]}"
        log.warning("frames: %s", msg)
        report.notes.append(msg)


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Frames stage: ``inp`` is the source folder (params.source.path); writes ``out_dir``."""
    inp = Path(inp)
    with stage_run("frames", out_dir) as (out, report):
        if params.source.kind == "images":
            _run_images(params, inp, out, report)
        else:
            _run_videos(params, inp, out, report)
    return report
