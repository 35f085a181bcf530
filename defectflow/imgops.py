"""Small image helpers shared by the detect / masks / roi / augment stages."""
from __future__ import annotations

import re
import zlib

import cv2
import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """File-name-safe form of an id: other characters become ``_``, plus a short hash
    of the original when anything changed, so two ids never share a file."""
    text = str(text)
    name = _UNSAFE.sub("_", text).strip("._")
    if name and name == text:
        return name
    return f"{name or 'item'}-{stable_hash(text):08x}"


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(str(text).encode("utf-8"))


def odd(n: float, minimum: int = 3) -> int:
    """Nearest odd integer >= ``minimum`` (kernel sizes)."""
    k = max(minimum, int(round(n)))
    return k if k % 2 else k + 1


def square_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """Square (x0, y0, side) centred on ``box`` = (x0, y0, x1, y1), x1/y1 exclusive.

    The side is the box's longer side plus ``margin`` times it on each side.
    The square may leave the frame; :func:`crop_square` pads it.
    """
    x0, y0, x1, y1 = box
    longer = max(x1 - x0, y1 - y0, 1)
    side = max(1, int(round(longer * (1.0 + 2.0 * margin))))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side


def crop_square(img: np.ndarray, square: tuple[int, int, int], size: int) -> np.ndarray:
    """Cut ``square`` = (x0, y0, side) out of ``img`` (black outside it), resized to ``size``."""
    x0, y0, side = square
    h, w = img.shape[:2]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + side - w), max(0, y0 + side - h)
    if pad_l or pad_t or pad_r or pad_b:
        img = cv2.copyMakeBorder(img, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_CONSTANT, value=0)
        x0, y0 = x0 + pad_l, y0 + pad_t
    patch = img[y0:y0 + side, x0:x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def colour_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel largest absolute channel difference of two same-sized images (uint8)."""
    d = cv2.absdiff(a, b)
    return d.max(axis=2) if d.ndim == 3 else d


def largest_filled(binary: np.ndarray) -> np.ndarray:
    """Keep the largest external component of a 0/255 mask, holes filled (0/255 uint8)."""
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(binary.shape[:2], np.uint8)
    if contours:
        biggest = max(contours, key=cv2.contourArea)
        cv2.drawContours(out, [biggest], -1, 255, thickness=cv2.FILLED)
    return out


def shrink_and_pad(mask: np.ndarray, shrink: float) -> np.ndarray:
    """Scale ``mask`` by (1 - shrink) about the image centre, padded back to full size (seed 000, Fig. 4d)."""
    if shrink <= 0:
        return mask.copy()
    h, w = mask.shape[:2]
    nh, nw = max(1, int(round(h * (1 - shrink)))), max(1, int(round(w * (1 - shrink))))
    small = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    top, left = (h - nh) // 2, (w - nw) // 2
    return cv2.copyMakeBorder(small, top, h - nh - top, left, w - nw - left, cv2.BORDER_CONSTANT, value=0)
