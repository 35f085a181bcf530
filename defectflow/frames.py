"""Frames stage: cut each video into product passes and keep the frames around the view centre.

For each video (one camera of one run) motion is measured on a downscaled grey copy of the
watched region (``frames.region``) of each frame against a running background (started from
the median of the first frames, then updated where nothing moves). With ``frames.shake_px``
(hand-held cameras) a pixel only counts as moving when it differs from the background at every
offset within that many pixels (grey erosion / dilation of the background). A pass is a run of
frames whose largest moving blob covers at least ``frames.min_area`` of the region, lasting at
least ``frames.min_pass_frames`` frames (gaps of up to ``MAX_GAP`` frames are bridged), whose
blob centre moves across at least ``frames.min_travel`` of the region width (a product crosses
the view; shake, a hand reaching in and out or an object left standing do not). Its centre frame
is the one whose blob centroid is nearest the region's horizontal centre; ``frames.window``
frames around it are kept.

The video is decoded once, front to back; only a small ring buffer of frames and the window of
each open pass are held in memory. MJPG videos (the demo's, most USB / industrial cameras) take a
fast path when ``frames.jpeg_passthrough`` is on: the container's JPEG packets are read as they
are, motion runs on a reduced-size greyscale JPEG decode (DCT scaling: a fraction of a full
decode), and the kept frames are written as the video's own JPEG bytes (``.jpg``, no re-encode,
no loss beyond the video's). Other codecs are decoded fully and kept frames are written as PNG
(fast zlib level, on a background thread).

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
from typing import Callable, Iterator, Union

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import FramesParams, Params
from defectflow.manifest import FRAMES, write_manifest
from defectflow.sources.videos import VideoReadError, VideoSourceError, camera_label, load_passes, load_videos
from defectflow.stage import StageOutput, StageReport, logger, stage_run

MAX_GAP = 2                  # frames a pass may lose its blob and still go on
WORK_WIDTH = 80              # motion is measured on frames downscaled to at most this width
BG_FRAMES = 40               # the background starts as the median of this many first frames
BG_RATE = 0.05               # running background update where nothing moves
BG_BUFFER_BYTES = 64 << 20   # cap on frames held while the background starts
# kept frames of non-MJPG videos: zlib level 1, RLE, "up" filter: the fastest lossless setting measured
# (1.4 ms for 320x240 vs 1.8 ms OpenCV's default and 2.8 ms level 1 alone), files as small as level 1's
PNG_ARGS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP)
JPEG_FOURCCS = {"MJPG", "mjpg", "MJPEG", "AVRn", "LJPG", "JPEG", "jpeg", "dmb1"}
_REDUCED = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
            4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}

Payload = Union[np.ndarray, bytes]   # a decoded BGR frame, or the frame's JPEG bytes (passthrough)

log = logger("frames")


# ----------------------------------------------------------------------------- motion

class MotionDetector:
    """Largest moving blob of a frame against a running background, inside ``region``.

    ``reduce``: the frames handed to :meth:`small` are already downscaled by this factor
    (reduced JPEG decode); blob positions are reported in full-frame pixels either way.
    """

    def __init__(self, frame_shape: tuple[int, ...], fp: FramesParams, reduce: int = 1):
        h, w = frame_shape[:2]
        rx0, ry0, rx1, ry1 = fp.region or (0.0, 0.0, 1.0, 1.0)
        self.x0, self.y0 = int(rx0 * w), int(ry0 * h)
        self.x1, self.y1 = max(int(math.ceil(rx1 * w)), self.x0 + 1), max(int(math.ceil(ry1 * h)), self.y0 + 1)
        self.width = self.x1 - self.x0
        self.reduce = reduce
        self.rx0, self.ry0 = self.x0 // reduce, self.y0 // reduce
        self.rx1 = max(-(-self.x1 // reduce), self.rx0 + 1)
        self.ry1 = max(-(-self.y1 // reduce), self.ry0 + 1)
        scale = min(1.0, WORK_WIDTH / self.width)
        self.size = (max(1, round(self.width * scale)), max(1, round((self.y1 - self.y0) * scale)))
        self.scale = self.size[0] / self.width          # small pixels per frame pixel
        self.center_x = (self.x0 + self.x1) / 2
        self.threshold = float(fp.motion_threshold)
        self.min_px = fp.min_area * self.size[0] * self.size[1]
        shake = int(math.ceil(fp.shake_px * self.scale)) if fp.shake_px else 0
        self._shake = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * shake + 1,) * 2) if shake else None
        self.bg: np.ndarray | None = None
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))

    def small(self, frame: np.ndarray) -> np.ndarray:
        """Grey, downscaled float32 copy of the watched region (area averaging also tames noise)."""
        roi = frame[self.ry0:self.ry1, self.rx0:self.rx1]
        if roi.ndim == 3:                      # grey first: the resize then moves a third of the bytes
            roi = cv2.cvtColor(roi, cv2.COLOR_BGR2GRAY)
        if roi.shape[1] != self.size[0] or roi.shape[0] != self.size[1]:
            roi = cv2.resize(roi, self.size, interpolation=cv2.INTER_AREA)
        return roi.astype(np.float32)

    def start(self, smalls: list[np.ndarray]) -> None:
        self.bg = np.median(np.stack(smalls), axis=0).astype(np.float32)

    def moving(self, small: np.ndarray) -> np.ndarray:
        """0/1 mask of pixels that differ from the background (by more than the shake allows)."""
        if self._shake is None:
            return (cv2.absdiff(small, self.bg) > self.threshold).astype(np.uint8)
        hi = cv2.dilate(self.bg, self._shake)
        lo = cv2.erode(self.bg, self._shake)
        return ((small > hi + self.threshold) | (small < lo - self.threshold)).astype(np.uint8)

    def centroid(self, small: np.ndarray) -> float | None:
        """x of the largest blob's centroid in frame pixels, or None when no blob is big enough.

        Also updates the background where nothing moves.
        """
        moving = self.moving(small)
        big = cv2.countNonZero(moving) >= self.min_px
        if big:
            moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, None)
            moving = cv2.morphologyEx(moving, cv2.MORPH_CLOSE, self._kernel)
        cv2.accumulateWeighted(small, self.bg, BG_RATE, mask=1 - moving)
        if not big or cv2.countNonZero(moving) < self.min_px:
            return None
        contours, _ = cv2.findContours(moving, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        m = max((cv2.moments(c) for c in contours), key=lambda mo: mo["m00"])
        if m["m00"] < self.min_px:
            return None
        return self.x0 + m["m10"] / m["m00"] / self.scale

    def offset(self, small: np.ndarray) -> float | None:
        """|blob centroid x - view centre| in frame pixels, or None (see :meth:`centroid`)."""
        x = self.centroid(small)
        return None if x is None else abs(x - self.center_x)


# ----------------------------------------------------------------------------- passes

@dataclass
class Pass:
    """A product crossing the view: frames ``start..end`` with a blob, ``center`` nearest the centre."""

    start: int
    end: int
    n_seen: int = 0
    center: int = -1
    dist: float = math.inf
    x_min: float = math.inf
    x_max: float = -math.inf
    frames: dict[int, Payload] = field(default_factory=dict)
    index: int = -1

    @property
    def travel(self) -> float:
        return max(0.0, self.x_max - self.x_min)


class PassTracker:
    """Groups per-frame blobs into passes and keeps the window of frames around each centre.

    ``center_x``: the view centre (frame px); ``min_travel_px``: how far a pass's blob centre
    must move to count (shorter runs are dropped and counted in ``n_dropped``).
    """

    def __init__(self, window: int, min_frames: int, max_gap: int = MAX_GAP,
                 center_x: float = 0.0, min_travel_px: float = 0.0):
        self.before, self.after = (window - 1) // 2, window // 2
        self.min_frames, self.max_gap = min_frames, max_gap
        self.center_x, self.min_travel = center_x, min_travel_px
        self.ring: deque[tuple[int, Payload]] = deque(maxlen=self.before + 1)
        self.active: Pass | None = None
        self.pending: list[Pass] = []
        self.n_passes = 0
        self.n_dropped = 0

    def feed(self, t: int, frame: Payload, x: float | None) -> list[Pass]:
        """Add frame ``t`` (``x``: blob centroid in frame px, None: no blob); return finished passes."""
        self.ring.append((t, frame))
        if self.active is not None and t - self.active.end > self.max_gap:
            self._close()
        if x is not None:
            p = self.active = self.active or Pass(start=t, end=t)
            p.end, p.n_seen = t, p.n_seen + 1
            p.x_min, p.x_max = min(p.x_min, x), max(p.x_max, x)
            dist = abs(x - self.center_x)
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
        if p is None:
            return
        if p.n_seen >= self.min_frames and p.travel >= self.min_travel:
            p.index, self.n_passes = self.n_passes, self.n_passes + 1
            self.pending.append(p)
        else:
            self.n_dropped += 1


# ----------------------------------------------------------------------------- one video

@dataclass
class VideoScan:
    """What reading one video gave."""

    path: str
    fps: float
    expected: int          # frame count from the container (0: unknown)
    n_read: int = 0
    n_passes: int = 0
    n_dropped: int = 0     # blob runs too short or too static to be a pass
    jpeg: bool = False     # read through the MJPG passthrough
    bad_frame: int | None = None   # first frame whose JPEG packet did not decode (passthrough)
    problem: str | None = None


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
    return "".join(chr((code >> 8 * i) & 0xFF) for i in range(4)).strip("\x00 ")


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


class _JpegStream:
    """MJPG passthrough: a capture in raw-packet mode; each packet is one JPEG frame."""

    def __init__(self, cap: cv2.VideoCapture, shape: tuple[int, int], reduce: int):
        self.cap, self.shape, self.reduce, self.flag = cap, shape, reduce, _REDUCED[reduce]

    @staticmethod
    def open(path: Path | str, fp: FramesParams) -> "_JpegStream | None":
        """The passthrough for ``path``, or None (not MJPG, raw mode unsupported, packets not plain JPEG)."""
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened() or _fourcc(cap) not in JPEG_FOURCCS or not cap.set(cv2.CAP_PROP_FORMAT, -1):
                cap.release()
                return None
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            ok, pkt = cap.read()
            full = cv2.imdecode(pkt, cv2.IMREAD_COLOR) if ok and pkt is not None and pkt.size else None
        except cv2.error:
            cap.release()
            return None
        if full is None or full.shape[:2] != (h, w):
            cap.release()
            return None
        cap.release()                                    # re-open: the probe consumed the first packet
        cap = cv2.VideoCapture(str(path))
        cap.set(cv2.CAP_PROP_FORMAT, -1)
        rx0, _, rx1, _ = fp.region or (0.0, 0.0, 1.0, 1.0)
        region_w = (rx1 - rx0) * w
        reduce = max([k for k in (1, 2, 4, 8) if region_w / k >= WORK_WIDTH] or [1])
        return _JpegStream(cap, (h, w), reduce)

    def frames(self, scan: VideoScan, detector: MotionDetector) -> Iterator[tuple[int, bytes, np.ndarray]]:
        """(index, JPEG bytes, small grey) per frame; a packet that does not decode ends the stream."""
        while True:
            try:
                ok, pkt = self.cap.read()
            except cv2.error as err:
                scan.problem = f"decode error after frame {scan.n_read}: {str(err).strip()}"
                return
            if not ok or pkt is None or not pkt.size:
                return
            grey = cv2.imdecode(pkt, self.flag)
            if grey is None:
                scan.bad_frame = scan.n_read
                return
            yield scan.n_read, pkt.tobytes(), detector.small(grey)
            scan.n_read += 1


def _nbytes(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, np.ndarray) else len(payload)


def _started(stream: Iterator[tuple[int, Payload, np.ndarray]], detector: MotionDetector
             ) -> Iterator[tuple[int, Payload, np.ndarray]]:
    """Starts the detector's background on the first frames (held briefly, at most
    BG_BUFFER_BYTES) before handing them on."""
    first = next(stream, None)
    if first is None:
        return
    n_start = max(1, min(BG_FRAMES, BG_BUFFER_BYTES // max(_nbytes(first[1]), 1)))
    buf = deque([first])
    buf.extend(x for _, x in zip(range(n_start - 1), stream))
    detector.start([s for _, _, s in buf])
    yield from buf
    yield from stream


def scan_video(path: Path | str, fp: FramesParams, on_pass: Callable[[Pass, VideoScan], None]) -> VideoScan:
    """Decode ``path`` once, calling ``on_pass(pass, scan)`` for each product pass (with its frames).

    A pass's frames are BGR arrays, or JPEG bytes when the MJPG passthrough was used
    (``scan.jpeg``). Raises VideoReadError when the file cannot be opened; a truncated or
    undecodable stream is reported in ``VideoScan.problem`` (the passes seen so far have been
    handed on).
    """
    jpeg = _JpegStream.open(path, fp) if fp.jpeg_passthrough else None
    cap = jpeg.cap if jpeg else cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError(f"{path}: cannot open the video (unreadable, corrupt or not a video file)")
    scan = VideoScan(str(path), cap.get(cv2.CAP_PROP_FPS) or 0.0, max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0),
                     jpeg=jpeg is not None)
    try:
        if jpeg:
            detector = MotionDetector(jpeg.shape, fp, reduce=jpeg.reduce)
            stream = jpeg.frames(scan, detector)
        else:
            frames = _decode(cap, scan)
            first = next(frames, None)
            detector = MotionDetector(first[1].shape, fp) if first is not None else None
            stream = ((t, f, detector.small(f)) for t, f in chain([first], frames)) if first is not None else iter(())
        tracker = PassTracker(fp.window, fp.min_pass_frames, center_x=detector.center_x if detector else 0.0,
                              min_travel_px=fp.min_travel * detector.width if detector else 0.0)
        for t, payload, small in _started(stream, detector):
            for p in tracker.feed(t, payload, detector.centroid(small)):
                on_pass(p, scan)
        for p in tracker.flush():
            on_pass(p, scan)
        scan.n_passes, scan.n_dropped = tracker.n_passes, tracker.n_dropped
    finally:
        cap.release()
    if scan.problem is None:
        if scan.n_read == 0:
            scan.problem = "no frame could be decoded"
        elif scan.expected and scan.n_read < scan.expected - max(1, scan.expected // 100):
            scan.problem = f"truncated: decoded {scan.n_read} of {scan.expected} frames"
        elif scan.bad_frame is not None:
            scan.problem = f"frame {scan.bad_frame} does not decode (corrupt JPEG packet)"
        if scan.problem and scan.bad_frame is not None and "does not decode" not in scan.problem:
            scan.problem += f" (frame {scan.bad_frame} does not decode)"
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


def _write_frame(path: Path, frame: Payload) -> None:
    """Inside the stage's temp folder: no per-file atomic rename needed."""
    if isinstance(frame, np.ndarray):
        ok, buf = cv2.imencode(".png", frame, PNG_ARGS)
        if not ok:
            raise ValueError(f"{path}: could not encode frame of shape {frame.shape}")
        frame = buf.tobytes()
    path.write_bytes(frame)


class _Writer:
    """Writes PNGs on a background thread (encoding overlaps decoding); at most ``limit`` queued."""

    def __init__(self, limit: int = 64):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frames-png")
        self.queue: deque[Future] = deque()
        self.limit = limit

    def write(self, path: Path, frame: Payload) -> None:
        """Queue ``frame``: a BGR array (PNG, fast level) or JPEG bytes (written as they are)."""
        while len(self.queue) >= self.limit:
            self.queue.popleft().result()
        self.queue.append(self.pool.submit(_write_frame, path, frame))

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            while self.queue:
                self.queue.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _pass_rows(p: Pass, video, scan: VideoScan, products: _Products, out: StageOutput, source: str,
               writer: _Writer) -> list[dict]:
    """Queue the pass's frames (JPEG bytes as they are, else PNG) and return their FRAMES rows."""
    base = {"run": video.run, "camera": video.camera, "source": source, "video_path": video.path,
            "pass_index": p.index, "gt_mask_path": None, **products.info(video, p.index)}
    rows = []
    tmp_any, recorded_any = out.path(f"frames/{video.run}_{video.camera}/-")     # one mkdir per pass
    folder, recorded_folder = tmp_any.parent, recorded_any.rsplit("/", 1)[0]
    ext = ".jpg" if scan.jpeg else ".png"
    for i in sorted(p.frames):
        item_id = f"{video.run}_{video.camera}_p{p.index:03d}_f{i:05d}"
        tmp, recorded = folder / f"{item_id}{ext}", f"{recorded_folder}/{item_id}{ext}"
        writer.write(tmp, p.frames[i])            # file creation is slow on some disks: off the decode thread
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
            "blob_runs_dropped": sum(s.n_dropped for s in acc.scans),
            "jpeg_passthrough_videos": sum(s.jpeg for s in acc.scans),
            "bad_videos": json.dumps(acc.bad), "videos_without_passes": json.dumps(acc.empty)}
    write_manifest(df, FRAMES, out.manifest, meta=meta)
    report.read.append(f"{inp} ({len(videos)} videos, {meta['frames_decoded']} frames decoded)")
    report.n_in, report.n_out = len(videos), len(df)
    report.notes.append(f"{meta['passes']} product passes, {len(df)} frames written "
                        f"({int(df['is_center'].sum())} centre frames); {meta['blob_runs_dropped']} moving "
                        f"blob run(s) too short or too static to be a pass; {meta['jpeg_passthrough_videos']} "
                        f"MJPG video(s) read through the JPEG passthrough")
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
