"""Remove the temp folders / files that killed runs left, only while nothing can be writing them.

    defectflow clean-temp [--min-age MINUTES]

What goes: ``.NAME.*.tmp*`` of ``fsutil.atomic_dir`` / ``atomic_path`` in the project, ``data/``,
``models/`` and ``source.path``; ``registry/.tmp-*`` and artifact folders no version points at.
Safe because it runs under the nightly lock (no nightly run, no ``defectflow gate``), holds DVC's
repo lock with no dvc stage running (``.dvc/tmp/lock``, ``.dvc/tmp/rwlock``), and (the CLI) keeps
temps changed in the last ``--min-age`` minutes: a stage run by hand (``defectflow stage``) takes no lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from defectflow import layout
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.registry.store import Registry
from defectflow.stage import logger

log = logger("cleanup")
STAGE_TMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")   # fsutil.atomic_dir / atomic_path temp names


class TempInUse(DefectflowError):
    """A dvc command is running in the project: its temp folders may be in use."""


def age_s(path: Path, now: float | None = None) -> float:
    """Seconds since anything in ``path`` (a file, or a folder and everything below it) last changed."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return (time.time() if now is None else now) - newest


def _dvc_writers(rwlock: Path) -> list[str]:
    """'path (pid N: cmd)' of every output a live dvc process has write-locked."""
    import psutil

    try:
        data = json.loads(rwlock.read_text() or "{}")
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TempInUse(f"{rwlock}: not readable JSON ({err}); is dvc running? not cleaning") from None
    return [f"{path} (pid {info['pid']}: {info.get('cmd', '?')})" for path, info in data.get("write", {}).items()
            if psutil.pid_exists(int(info["pid"]))]


@contextlib.contextmanager
def dvc_idle(project: Path | str = ".") -> Iterator[None]:
    """Hold DVC's repo lock and check no dvc stage is running; raise TempInUse otherwise.
    No ``.dvc`` folder: nothing to check."""
    tmp = Path(project) / ".dvc" / "tmp"
    if not tmp.parent.is_dir():
        yield
        return
    import zc.lockfile

    tmp.mkdir(exist_ok=True)
    try:
        lock = zc.lockfile.LockFile(str(tmp / "lock"))
    except zc.lockfile.LockError:
        raise TempInUse(f"{tmp / 'lock'}: a dvc command holds the repo lock; not cleaning (try when it is done)") \
            from None
    try:
        writers = _dvc_writers(tmp / "rwlock")
        if writers:
            raise TempInUse(f"{tmp / 'rwlock'}: dvc is running a stage writing {writers[:3]}; not cleaning "
                            "(try when it is done)")
        yield
    finally:
        lock.close()


def clean_stale(params: Params, project: Path | str = ".", min_age_s: float = 0.0) -> tuple[list[Path], list[Path]]:
    """(removed, kept): temps a killed run left, those changed in the last ``min_age_s`` kept.
    Call it only under the nightly lock and ``dvc_idle``."""
    project, now = Path(project), time.time()
    removed, kept = [], []
    for d in {project, project / layout.DATA, project / layout.MODELS, project / params.source.path}:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not STAGE_TMP.match(p.name) or p.is_symlink():
                continue
            if min_age_s > 0 and age_s(p, now) < min_age_s:
                kept.append(p)
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d temp folder(s)/file(s) left by an interrupted run: %s",
                 len(removed), [str(p) for p in removed])
    reg_removed, reg_kept = Registry(project / params.registry.path, params.registry.keep).clean_stale(min_age_s)
    if kept + reg_kept:
        log.info("kept %d temp(s) changed in the last %.0f s (may belong to a running stage): %s",
                 len(kept + reg_kept), min_age_s, [str(p) for p in kept + reg_kept])
    return removed + reg_removed, kept + reg_kept
