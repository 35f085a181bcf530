"""Take new good samples from an inbox into the source folder DVC tracks, validated and deduplicated.

    defectflow ingest [INBOX]

Videos (``source.kind: demo | videos``): ``<run>_<camera>.<ext>`` files go to
``<source.path>/videos/ingest/<batch>/`` and get a ``videos.csv`` row (``split: train, label: good``,
run ``<batch>-<run>``, so a night's cameras stay one run). Images (``source.kind: images``) go to
``<source.path>/train/good/ingest-<batch>-<name>``. Every file is checked (decodes, size,
channels, video duration); an exact duplicate (sha256) of a file ingested before or of the data at
the first ingest is not added. Rejects and duplicates are moved to
``<ingest.quarantine>/<batch>/`` with ``<name>.reason.txt``: nothing is deleted.
``<source.path>/ingest.csv`` records what came when (``batch, received_at, inbox_name, stored_as,
sha256, bytes, status, reason``). Names cannot leave the data folder: only plain names
(letters, digits, ``._-``) of regular files, no ``..``, no absolute paths, symlinks never followed.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.fsutil import atomic_path
from defectflow.stage import logger

log = logger("ingest")
VIDEO_EXT = {".avi", ".mp4", ".mkv", ".mov"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
LOG_FILE = "ingest.csv"
LOG_COLUMNS = ["batch", "received_at", "inbox_name", "stored_as", "sha256", "bytes", "status", "reason"]


class IngestError(DefectflowError):
    """The inbox or the data folder cannot be ingested (missing, or every file rejected)."""


@dataclass
class IngestReport:
    batch: str
    added: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)   # inbox name -> reason
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"ingest {self.batch}: {len(self.added)} added, {len(self.duplicates)} duplicate(s), "
                f"{len(self.rejected)} rejected in {self.seconds:.1f}s")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_shape(h: int, w: int, c: int, p) -> str | None:
    if min(h, w) < p.min_side or max(h, w) > p.max_side:
        return f"size {w}x{h} outside ingest.min_side {p.min_side} .. max_side {p.max_side}"
    if c not in p.channels:
        return f"{c} channel(s), ingest.channels allows {list(p.channels)}"
    return None


def check_image(path: Path, p) -> str | None:
    """None when the image is fine, else why not."""
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return "does not decode as an image"
    return _check_shape(img.shape[0], img.shape[1], 1 if img.ndim == 2 else img.shape[2], p)


def check_video(path: Path, p) -> str | None:
    """None when the video decodes with an accepted size, channels and duration, else why not."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return "does not open as a video"
        ok, frame = cap.read()
        if not ok or frame is None:
            return "no decodable frame"
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0
    finally:
        cap.release()
    bad = _check_shape(frame.shape[0], frame.shape[1], 1 if frame.ndim == 2 else frame.shape[2], p)
    if bad:
        return bad
    if fps <= 0 or n <= 0:
        return "no frame rate / frame count: duration unknown"
    duration = n / fps
    if not p.min_duration_s <= duration <= p.max_duration_s:
        return f"duration {duration:.2f}s outside ingest.min_duration_s {p.min_duration_s} .. max_duration_s {p.max_duration_s}"
    return None


def _inside(root: Path, path: Path) -> bool:
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root


def _read_log(data: Path) -> pd.DataFrame:
    f = data / LOG_FILE
    if not f.is_file():
        return pd.DataFrame(columns=LOG_COLUMNS)
    return pd.read_csv(f, dtype=str, keep_default_na=False)


def _baseline(data: Path, kind: str, batch: str, now: str) -> list[dict]:
    """At the first ingest: the hashes of the data already there, so a re-delivered file is a duplicate."""
    files = (sorted((data / "videos").rglob("*")) if kind != "images" else sorted((data / "train" / "good").rglob("*")))
    return [{"batch": batch, "received_at": now, "inbox_name": "", "stored_as": f.relative_to(data).as_posix(),
             "sha256": sha256(f), "bytes": str(f.stat().st_size), "status": "baseline", "reason": ""}
            for f in files if f.is_file() and not f.is_symlink()]


def _quarantine(src: Path, qdir: Path, name: str, reason: str) -> None:
    qdir.mkdir(parents=True, exist_ok=True)
    dest = qdir / name
    k = 1
    while dest.exists() or dest.is_symlink():
        dest, k = qdir / f"{k}-{name}", k + 1
    os.rename(src, dest)                          # a symlink is moved as the link, never followed
    (qdir / f"{dest.name}.reason.txt").write_text(f"{name}: {reason}\n")


def _inbox_files(inbox: Path) -> list[tuple[Path, str]]:
    """(path, name relative to the inbox) of every entry below it; folders are walked, links never."""
    out = []
    for dirpath, dirnames, filenames in os.walk(inbox, followlinks=False):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in links and not d.startswith("."))
        for fn in sorted(filenames + links):
            p = Path(dirpath) / fn
            out.append((p, p.relative_to(inbox).as_posix()))
    return out


def ingest(params: Params, inbox: Path | str | None = None, *, project: Path | str = ".") -> IngestReport:
    """Move the inbox's files into ``source.path`` (valid, new) or the quarantine (with a reason)."""
    t0 = time.monotonic()
    project = Path(project)
    p = params.ingest
    inbox = project / (inbox or p.inbox)
    data = project / params.source.path
    kind = params.source.kind
    now_dt = datetime.now(timezone.utc)
    batch, now = now_dt.strftime("%Y%m%dT%H%M%S"), now_dt.isoformat(timespec="seconds")
    report = IngestReport(batch=batch)
    if not inbox.is_dir():
        raise IngestError(f"{inbox}: inbox folder not found (ingest.inbox)")
    if not data.is_dir():
        raise IngestError(f"{data}: source folder not found (source.path)")
    if kind != "images" and not (data / "videos.csv").is_file():
        raise IngestError(f"{data / 'videos.csv'}: not found; ingest adds videos to a videos folder")
    entries = _inbox_files(inbox)
    if not entries:
        log.info("ingest: %s is empty, nothing new", inbox)
        return report
    old_log = _read_log(data)
    new_rows = [] if len(old_log) else _baseline(data, kind, batch, now)
    known = {r["sha256"]: r["stored_as"] for r in [*old_log.to_dict("records"), *new_rows]
             if r["status"] in ("baseline", "added")}
    qdir = project / p.quarantine / batch
    dest_dir = data / "videos" / "ingest" / batch if kind != "images" else data / "train" / "good"
    video_rows, moved = [], []
    for path, name in tqdm(entries, desc="ingest", unit="file", disable=len(entries) < 20):
        reason, digest, size = None, "", ""
        ext = path.suffix.lower()
        if path.is_symlink() or not path.is_file():
            reason = "not a regular file (symlinks are not followed)"
        elif not SAFE_NAME.match(path.name) or ".." in name or os.path.isabs(name):
            reason = "unsafe name: use letters, digits and ._- only"
        elif ext not in (IMAGE_EXT if kind == "images" else VIDEO_EXT):
            reason = f"extension {ext or '(none)'} not accepted for source.kind {kind}"
        elif kind != "images" and "_" not in path.stem:
            reason = "video name must be <run>_<camera><ext>"
        if reason is None:
            digest, size = sha256(path), str(path.stat().st_size)
            if digest in known:
                report.duplicates.append(name)
                new_rows.append({"batch": batch, "received_at": now, "inbox_name": name, "stored_as": "",
                                 "sha256": digest, "bytes": size, "status": "duplicate", "reason": f"same bytes as {known[digest]}"})
                _quarantine(path, qdir, path.name, f"duplicate: same bytes as {known[digest]}")
                continue
            reason = check_image(path, p) if kind == "images" else check_video(path, p)
        if reason is not None:
            report.rejected[name] = reason
            new_rows.append({"batch": batch, "received_at": now, "inbox_name": name, "stored_as": "",
                             "sha256": digest, "bytes": size, "status": "rejected", "reason": reason})
            _quarantine(path, qdir, path.name, reason)
            continue
        stored = dest_dir / (path.name if kind != "images" else f"ingest-{batch}-{path.name}")
        stored.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(data, stored.parent) or stored.exists() or stored.is_symlink():
            raise IngestError(f"{stored}: would overwrite a file or leave {data}; this file was not moved")
        with atomic_path(stored) as tmp:
            shutil.copyfile(path, tmp)
        moved.append(path)
        known[digest] = stored.relative_to(data).as_posix()
        report.added.append(name)
        new_rows.append({"batch": batch, "received_at": now, "inbox_name": name, "stored_as": known[digest],
                         "sha256": digest, "bytes": size, "status": "added", "reason": ""})
        if kind != "images":
            run, camera = path.stem.rsplit("_", 1)
            video_rows.append({"video": known[digest], "camera": camera, "run": f"{batch}-{run}",
                               "split": "train", "label": "good"})
    if video_rows:
        _append_videos(data / "videos.csv", video_rows)
    with atomic_path(data / LOG_FILE) as tmp:
        pd.DataFrame([*old_log.to_dict("records"), *new_rows], columns=LOG_COLUMNS).to_csv(tmp, index=False)
    for path in moved:                # the copies and both tables are in place: now the inbox copy may go
        path.unlink()
    report.seconds = time.monotonic() - t0
    log.info("%s (read %s, wrote %s and %s; quarantine %s)", report.summary(), inbox, dest_dir,
             data / LOG_FILE, qdir if report.rejected or report.duplicates else "-")
    for name, why in report.rejected.items():
        log.warning("ingest: rejected %s: %s", name, why)
    if report.rejected and not report.added and not report.duplicates:
        raise IngestError(f"{inbox}: ingest rejected every file ({len(report.rejected)}), e.g. "
                          f"{next(iter(report.rejected.items()))}; see {qdir}")
    return report


def _append_videos(csv_file: Path, rows: list[dict]) -> None:
    """Append rows to videos.csv atomically, keeping its columns (a missing label column is added)."""
    df = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    if "label" not in df.columns:
        df["label"] = ""
    df = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)[list(df.columns)].fillna("")
    with atomic_path(csv_file) as tmp:
        df.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
