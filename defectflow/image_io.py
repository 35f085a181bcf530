"""Image files -> float RGB arrays, with errors that name the file.

Any file OpenCV reads: BGR -> RGB, grayscale -> 3 channels, RGBA composited over black, 16-bit
scaled to [0, 1]. Truncated PNG / JPEG files (which OpenCV decodes with grey rows and a warning
only) raise :class:`~defectflow.fsutil.ImageReadError`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from defectflow.fsutil import ImageReadError
from defectflow.stage import logger

log = logger("features")

def _complete(data: np.ndarray, path) -> None:
    """Raise ImageReadError for a PNG without IEND or a JPEG without its end marker (truncated files:
    OpenCV would decode them with grey / garbage rows and only a warning on stderr)."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG"):
        if b"IEND" not in bytes(data[-32:]):
            raise ImageReadError(f"{path}: truncated PNG (no IEND chunk)")
    elif head.startswith(b"\xff\xd8"):
        tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")


def decode_image(data: np.ndarray, path: str | os.PathLike) -> tuple[np.ndarray, Optional[str]]:
    """Decode file bytes to float32 RGB ``(H, W, 3)`` in [0, 1]; also return what was converted
    (``"grayscale"``, ``"rgba"``, ``"16-bit"``, combined with ``+``) or None."""
    if data.size == 0:
        raise ImageReadError(f"{path}: empty image file")
    _complete(data, path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    conv = []
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
        conv.append("16-bit")
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}")
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == 1:
        conv.insert(0, "grayscale")
        out = np.repeat(img, 3, axis=2)
    elif channels == 4:
        conv.insert(0, "rgba")
        out = np.ascontiguousarray(img[:, :, 2::-1] * img[:, :, 3:4])   # composite over black
    elif channels == 3:
        out = np.ascontiguousarray(img[:, :, ::-1])
    else:
        raise ImageReadError(f"{path}: unsupported number of channels ({channels})")
    return out, ("+".join(conv) or None)


def read_bytes(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read ({err})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as float32 RGB ``(H, W, 3)`` in [0, 1] (gray, RGBA and 16-bit converted;
    truncated PNG / JPEG files raise ImageReadError naming the file)."""
    img, conv = decode_image(read_bytes(path), path)
    if conv:
        log.debug("%s: converted %s image to 8-bit-range RGB", path, conv)
    return img


AUTO_SIZE_RANGE = (224, 448)      # train.image_size auto stays within these (backbone cost grows with the square)


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file, from a reduced decode where the format allows (JPEG, PNG)."""
    data = read_bytes(path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    return int(img.shape[0]), int(img.shape[1])


def auto_image_size(paths, sample: int = 48) -> int:
    """``train.image_size: auto``: the median short side of (a spread sample of) ``paths``, rounded down to a
    multiple of 32 and kept within :data:`AUTO_SIZE_RANGE`."""
    paths = list(paths)
    if not paths:
        raise ValueError("no images to choose an input size from")
    step = max(1, len(paths) // sample)
    short = float(np.median([min(image_shape(p)) for p in paths[::step][:sample]]))
    lo, hi = AUTO_SIZE_RANGE
    return int(min(hi, max(lo, 32 * int(short // 32))))
