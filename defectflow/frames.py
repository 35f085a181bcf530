"""Frames stage: track each product across each video and keep the frames around its crossing.

For each video (one camera of one run), motion is measured on a downscaled grey copy of the
camera's lanes (``frames.region``, a rectangle or polygon, or ``frames.lanes``: several belts,
each with its own region, direction of travel and counting line) against a running background
that is frozen under tracked products. Per tracked frame (every ``frames.stride``-th) the
foreground blobs of each lane, cut where touching products form one blob, go to that lane's
multi-object tracker (norfair: see ``defectflow/tracking``); each track is one product. A product
is captured once, when its track's centre crosses the lane's counting line (default: across the
direction of travel through the lane's centre) in the direction of travel (``frames.direction``:
explicit, or ``auto`` from the tracks' motion); the ``frames.window`` frames around that crossing
are kept, with the track's box at each. The count stands when the track ends, if it lived
``frames.min_pass_frames`` frames and moved across ``frames.min_travel`` of its lane (shake, a hand
reaching in and out or an object left standing do not count). Passes are numbered per lane in the
order of their crossing. Also written per video: ``tracks/<run>_<camera>.parquet``, every track's
box at every tracked frame (detect masks the products out of its background plate with it).

The video is decoded once, front to back, and tracked by ``defectflow/video_scan.py`` (decoding in
``video_decode.py``: MJPG videos keep their JPEG bytes, other codecs are decoded and kept frames written
as PNG on a background thread here).
For the ``images`` source there is no video: the items are forwarded (``is_center`` true).
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd

from defectflow.config import FramesParams, Params
from defectflow.imgops import safe_name
from defectflow.manifest import FRAMES, write_manifest
from defectflow.sources.videos import (DEFAULT_LANE, Products, VideoReadError, VideoSourceError, load_passes,
                                       load_videos)
from defectflow.stage import StageOutput, StageReport, logger, stage_run
from defectflow.tracking.scan import VideoTracker
from defectflow.tracking.tracker import Capture
from defectflow.units import Mapper, Unit, UnitResult, map_units
from defectflow.units.core import quarantine_meta, results
from defectflow.video_decode import Payload, VideoScan
from defectflow.video_scan import scan_video

# kept frames of non-MJPG videos: zlib level 1, RLE, "up" filter: the fastest lossless setting measured
# (1.4 ms for 320x240 vs 1.8 ms OpenCV's default and 2.8 ms level 1 alone), files as small as level 1's
PNG_ARGS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP)
TRACK_LOG_COLUMNS = ["frame_index", "lane", "track_id", "x0", "y0", "x1", "y1"]

log = logger("frames")


# ----------------------------------------------------------------------------- stage

def _write_frame(path: Path, frame: Payload) -> None:
    """Inside the stage's temp folder: no per-file atomic rename needed."""
    if isinstance(frame, np.ndarray):
        ok, buf = cv2.imencode(".png", frame, PNG_ARGS)
        if not ok:
            raise ValueError(f"{path}: could not encode frame of shape {frame.shape}")
        frame = buf.tobytes()
    path.write_bytes(frame)


class _Writer:
    """Writes frames on a background thread (encoding overlaps decoding); at most ``limit`` queued."""

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


@dataclass
class _VideoRows:
    """One video's captures, written as they complete; rows numbered per lane by crossing frame at the end."""

    video: object
    out: StageOutput
    writer: _Writer
    captures: list[tuple[Capture, dict[int, str]]] = field(default_factory=list)

    def add(self, c: Capture, scan: VideoScan) -> None:
        tag = f"{safe_name(self.video.run)}_{safe_name(self.video.camera)}"
        tmp_any, recorded_any = self.out.path(f"frames/{tag}/-")          # one mkdir per capture
        folder, recorded_folder = tmp_any.parent, recorded_any.rsplit("/", 1)[0]
        ext = ".jpg" if scan.jpeg else ".png"
        paths = {}
        for i in sorted(c.frames):
            name = f"{safe_name(c.lane)}_t{c.track_id:04d}_f{i:05d}{ext}"
            self.writer.write(folder / name, c.frames[i])     # file creation is slow on some disks: off this thread
            paths[i] = f"{recorded_folder}/{name}"
        c.frames = {}
        self.captures.append((c, paths))

    def rows(self, scan: VideoScan, products: Products, source: str, extra: dict) -> list[dict]:
        v = self.video
        rows = []
        by_lane: dict[str, list] = {}
        for c, paths in self.captures:
            by_lane.setdefault(c.lane, []).append((c, paths))
        for lane, caps in by_lane.items():
            for k, (c, paths) in enumerate(sorted(caps, key=lambda cp: (cp[0].center, cp[0].track_id))):
                c.index = k
                base = {"run": v.run, "camera": v.camera, "source": source, "video_path": v.path, "pass_index": k,
                        "gt_mask_path": None, "lane": lane, "track_id": c.track_id, **extra,
                        **products.info(v, lane, k)}
                lane_part = "" if lane == DEFAULT_LANE else f"_{lane}"
                for i, path in paths.items():
                    box = [int(round(b)) for b in c.box_at(i)]
                    rows.append({**base, "item_id": f"{v.run}_{v.camera}{lane_part}_p{k:03d}_f{i:05d}",
                                 "image_path": path, "frame_index": i, "is_center": i == c.center,
                                 "t_sec": i / scan.fps if scan.fps > 0 else None,
                                 "track_x0": box[0], "track_y0": box[1], "track_x1": box[2], "track_y1": box[3]})
        return rows


def _check_demo(params: Params, inp: Path) -> None:
    """The demo source needs its videos generated first (the stage writes nothing outside out_dir)."""
    if params.source.kind == "demo" and not (inp / "videos.csv").exists():
        raise VideoSourceError(f"{inp}: no demo videos here (videos.csv not found); generate them first "
                               f"with `python -m defectflow.cli demo` (make demo)")


def _run_images(params: Params, inp: Path, out: StageOutput, report: StageReport,
                rows: tuple[int, int] | None = None) -> None:
    from defectflow.sources.images import load_items
    reason = "images source: no video to decode"
    df = load_items(params)
    df = (df if rows is None else df.iloc[rows[0]:rows[1]]).reset_index(drop=True).copy()
    df["is_center"] = True
    write_manifest(df, FRAMES, out.manifest, meta={"skipped": reason, "source": "images"})
    report.read.append(str(inp))
    report.n_in = report.n_out = len(df)
    report.notes.append(f"{reason}; forwarded {len(df)} images (is_center true)")


@dataclass
class _Scans:
    """What the videos gave: manifest rows, per-video scans, bad and pass-less videos."""

    rows: list[dict] = field(default_factory=list)
    scans: list[tuple[object, VideoScan, dict]] = field(default_factory=list)   # (video, scan, passes per lane)
    bad: list[dict] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def _track_log(video, vt: VideoTracker | None, out: StageOutput) -> dict:
    """Write the video's track log (every track's box at every tracked frame); its path for the rows."""
    if vt is None:
        return {}
    tmp, tracks_path = out.path(f"tracks/{safe_name(video.run)}_{safe_name(video.camera)}.parquet")
    pd.DataFrame(vt.log, columns=TRACK_LOG_COLUMNS).astype({"frame_index": "int64", "track_id": "int64"}).to_parquet(
        tmp, index=False)
    return {"tracks_path": tracks_path}


def _scan_one(video, fp: FramesParams, products: Products, out: StageOutput, source: str, writer: _Writer,
              acc: _Scans) -> None:
    """Scan one video into ``acc``; bad videos raise (on_bad_video: error) or are recorded (warn)."""
    vrows = _VideoRows(video, out, writer)
    try:
        scan, vt = scan_video(video.path, fp, vrows.add, camera=video.camera)
    except VideoReadError as err:
        if fp.on_bad_video == "error":
            raise
        acc.bad.append({"video": video.path, "problem": str(err), "frames_read": 0})
        log.warning("frames: %s (skipped: frames.on_bad_video is warn)", err)
        return
    rows = vrows.rows(scan, products, source, _track_log(video, vt, out))
    scan.n_passes = len(vrows.captures)
    per_lane: dict[str, int] = {ln.name: 0 for ln in (vt.lanes if vt else [])}
    for c, _ in vrows.captures:
        per_lane[c.lane] = per_lane.get(c.lane, 0) + 1
    acc.rows.extend(rows)
    acc.scans.append((video, scan, per_lane))
    if scan.problem:
        if fp.on_bad_video == "error":
            raise VideoReadError(f"{video.path}: {scan.problem} (set frames.on_bad_video: warn to keep what was read)")
        acc.bad.append({"video": video.path, "problem": scan.problem, "frames_read": scan.n_read})
        log.warning("frames: %s: %s; kept the %d pass(es) read so far", video.path, scan.problem, scan.n_passes)
    if scan.n_passes == 0:
        acc.empty.append(video.path)
        log.warning("frames: %s: no product pass found (%d frames read)", video.path, scan.n_read)


def _passes_by_run(passes: pd.DataFrame | None) -> dict[str, list[dict]]:
    if passes is None:
        return {}
    out: dict[str, list[dict]] = {}
    for r in passes.to_dict("records"):
        out.setdefault(r["run"], []).append(r)
    return out


def video_units(inp: Path, runs: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None, list[Unit]]:
    """One unit per video (videos.csv order; only ``runs`` if given): the video's row and its run's passes."""
    videos = load_videos(inp)
    if runs is not None:
        videos = videos[videos["run"].isin(runs)].reset_index(drop=True)
    passes = load_passes(inp)
    by_run = _passes_by_run(passes)
    units = [Unit(f"{v['run']}_{v['camera']}",
                  {"video": v, "passes": by_run.get(v["run"], []) if passes is not None else None},
                  (v["path"],))
             for v in videos.to_dict("records")]
    return videos, passes, units


def run_unit(params: Params, unit: Unit, out: StageOutput) -> UnitResult:
    """Track one video: its rows and what the stage's meta and checks need."""
    p = unit.payload
    video = SimpleNamespace(**p["video"])
    products = Products(None if p["passes"] is None else pd.DataFrame(p["passes"]))
    acc, writer = _Scans(), _Writer()
    try:
        _scan_one(video, params.frames, products, out, params.source.kind, writer, acc)
    finally:
        writer.close()
    return UnitResult(acc.rows, {"scans": [(p["video"], s, per) for _, s, per in acc.scans], "bad": acc.bad,
                                 "empty": acc.empty, "unlisted": products.unlisted,
                                 "from_videos": products.from_videos})


def _run_videos(params: Params, inp: Path, out: StageOutput, report: StageReport, mapper: Mapper | None,
                runs: list[str] | None) -> None:
    fp, source = params.frames, params.source.kind
    _check_demo(params, inp)
    videos, passes, units = video_units(inp, runs)
    products = Products(passes)
    t0 = time.perf_counter()
    settings = {"frames": fp.model_dump(mode="json"), "source": source}
    outcomes = map_units("frames", params, units, run_unit, out, settings, report, mapper)
    acc = _Scans()
    for res in results(outcomes):
        acc.rows += res.rows
        acc.scans += [(SimpleNamespace(**v), s, per) for v, s, per in res.stats["scans"]]
        acc.bad += res.stats["bad"]
        acc.empty += res.stats["empty"]
        products.unlisted += res.stats["unlisted"]
        products.from_videos += res.stats.get("from_videos", [])
    df = pd.DataFrame(acc.rows, columns=FRAMES.names)
    scans = [s for _, s, _ in acc.scans]
    _check_counts(acc.scans, products, report)
    meta = {"source": source, "videos": len(videos), "passes": sum(s.n_passes for s in scans),
            "frames_decoded": sum(s.n_read for s in scans), "window": fp.window, "stride": fp.stride,
            "tracks": sum(s.n_tracks for s in scans), "tracks_not_counted": sum(s.n_dropped for s in scans),
            "lanes": json.dumps(sorted({ln for _, _, per in acc.scans for ln in per})),
            "jpeg_passthrough_videos": sum(s.jpeg for s in scans),
            "bad_videos": json.dumps(acc.bad), "videos_without_passes": json.dumps(acc.empty),
            **quarantine_meta(outcomes)}
    write_manifest(df, FRAMES, out.manifest, meta=meta)
    secs = time.perf_counter() - t0
    report.read.append(f"{inp} ({len(videos)} videos, {meta['frames_decoded']} frames decoded in {secs:.1f} s)")
    report.n_in, report.n_out = len(videos), len(df)
    report.notes.append(f"{meta['passes']} product passes, {len(df)} frames written "
                        f"({int(df['is_center'].sum())} centre frames); {meta['tracks']} tracks, "
                        f"{meta['tracks_not_counted']} not counted (never crossed a counting line in the direction "
                        f"of travel, too short or too static); lanes {meta['lanes']}; "
                        f"{meta['jpeg_passthrough_videos']} MJPG video(s) read through the JPEG passthrough")
    report.notes += [f"bad video, kept what was read: {b['video']}: {b['problem']}" for b in acc.bad]
    if acc.empty:
        report.notes.append(f"{len(acc.empty)} video(s) without a product pass: {', '.join(acc.empty)}")


def _check_counts(scans: list[tuple], products: Products, report: StageReport) -> None:
    """Warn when the cameras of a run disagree on a lane's number of passes, or disagree with passes.csv."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for video, _, per_lane in scans:
        for lane, n in per_lane.items():
            counts.setdefault((video.run, lane), {})[video.camera] = n
    for (run, lane), per_cam in counts.items():
        expected = products.expected(run, lane)
        if len(set(per_cam.values())) > 1 or (expected is not None and any(c != expected for c in per_cam.values())):
            where = f"run {run}" + ("" if lane == DEFAULT_LANE else f" lane {lane}")
            msg = f"{where}: passes found per camera {per_cam}" + (
                f", passes.csv lists {expected}" if expected is not None else "")
            log.warning("frames: %s", msg)
            report.notes.append(msg)
    if products.unlisted:
        msg = f"{len(products.unlisted)} pass(es) not in passes.csv (ids from the run name): {products.unlisted[:5]}"
        log.warning("frames: %s", msg)
        report.notes.append(msg)
    if products.from_videos:
        runs = sorted(set(products.from_videos))
        msg = f"{len(products.from_videos)} pass(es) of runs not in passes.csv labelled from videos.csv: {runs[:5]}"
        log.info("frames: %s", msg)
        report.notes.append(msg)


def run(params: Params, inp: Path, out_dir: Path, mapper: Mapper | None = None,
        runs: list[str] | None = None, rows: tuple[int, int] | None = None) -> StageReport:
    """Frames stage: ``inp`` is the source folder (params.source.path); writes ``out_dir``.

    Videos are units (``video_units`` / ``run_unit``) mapped by ``mapper`` (default: serially);
    ``runs``: only the videos of these runs; ``rows``: only the images source's rows ``[start, stop)``
    (the score flow's chunks).
    """
    inp = Path(inp)
    with stage_run("frames", out_dir) as (out, report):
        if params.source.kind == "images":
            _run_images(params, inp, out, report, rows)
        else:
            _run_videos(params, inp, out, report, mapper, runs)
    return report
