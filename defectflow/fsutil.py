"""Atomic file and folder writes, and image reading with clear errors."""
from __future__ import annotations

from defectflow.errors import DefectflowError

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np


class ImageReadError(DefectflowError):
    """An image file is missing, unreadable or truncated."""


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; it replaces ``path`` only if the block succeeds.

    On failure the old folder (e.g. the last good model) is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are for everyone on the line PC to read
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_image(path: Path | str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Read an image as BGR uint8 (or as ``flags`` says); raise ImageReadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    return img


def write_image(path: Path | str, img: np.ndarray, atomic: bool = True) -> Path:
    """Write an image (format from the suffix); ``atomic=False`` inside a stage's temp folder,
    which is itself swapped in atomically."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise ValueError(f"{path}: could not encode image of shape {img.shape}")
    if not atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf.tofile(path)
        return path
    with atomic_path(path) as tmp:
        buf.tofile(tmp)
    return path
