"""Product candidates per frame: foreground blobs against a running background, split where
touching products form one blob.

The background starts as the per-pixel most frequent grey level of the first frames (robust when
products cover the belt most of the time, unlike a median), then follows slow light changes where
nothing moves and no track is (a product stopped on the belt stays foreground). A blob longer
than about 1.5 product lengths along the direction of travel is cut into products: at multiples
of the product length from its fully visible end, each cut moved to the thinnest cross-section
nearby (the gap or neck between two products, where there is one). The product length is
``frames.product_length`` or the 30th percentile of the lengths of blobs that touch no lane edge.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from defectflow.config import FramesParams

BG_RATE = 0.05               # running background update where nothing moves and nothing is tracked
MODE_BIN = 8                 # grey levels per bin of the starting background's histogram
SPLIT_AT = 1.5               # a blob this many product lengths long (or more) is cut
CUT_SEARCH = 0.25            # a cut moves to the thinnest cross-section within this share of a length
MIN_PIECE = 0.35             # a piece shorter than this share of a length (at a lane edge) joins its neighbour
LENGTH_SAMPLES = 200         # lengths of separate blobs remembered per lane
LENGTH_MIN_SAMPLES = 12      # no estimate from fewer
LENGTH_QUANTILE = 30


def mode_background(smalls: list[np.ndarray]) -> np.ndarray:
    """Per-pixel most frequent value (bins of MODE_BIN grey levels, neighbours pooled) of float frames."""
    stack = np.clip(np.stack(smalls), 0, 255).astype(np.float32)
    q = (stack // MODE_BIN).astype(np.int16)
    n_bins = 256 // MODE_BIN
    counts = np.stack([(q == b).sum(axis=0) for b in range(n_bins)]).astype(np.float32)
    pooled = counts.copy()
    pooled[1:] += counts[:-1]
    pooled[:-1] += counts[1:]
    best = pooled.argmax(axis=0)
    near = np.abs(q - best[None]) <= 1
    vals = np.where(near, stack, np.nan)
    return np.nanmedian(vals, axis=0).astype(np.float32)


class BackgroundModel:
    """Running grey background on the motion grid; ``moving`` marks what differs from it."""

    def __init__(self, scale: float, fp: FramesParams):
        self.threshold = float(fp.motion_threshold)
        shake = int(math.ceil(fp.shake_px * scale)) if fp.shake_px else 0
        self._shake = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * shake + 1,) * 2) if shake else None
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        self.bg: np.ndarray | None = None

    def start(self, smalls: list[np.ndarray]) -> None:
        self.bg = mode_background(smalls)

    def moving(self, small: np.ndarray) -> np.ndarray:
        """0/1 uint8 mask of pixels that differ from the background (by more than the shake allows), cleaned."""
        if self._shake is None:
            raw = (cv2.absdiff(small, self.bg) > self.threshold).astype(np.uint8)
        else:
            hi = cv2.dilate(self.bg, self._shake)
            lo = cv2.erode(self.bg, self._shake)
            raw = ((small > hi + self.threshold) | (small < lo - self.threshold)).astype(np.uint8)
        raw = cv2.morphologyEx(raw, cv2.MORPH_OPEN, None)
        return cv2.morphologyEx(raw, cv2.MORPH_CLOSE, self._close)

    def update(self, small: np.ndarray, moving: np.ndarray, frozen: list[tuple[int, int, int, int]]) -> None:
        """Blend ``small`` into the background where nothing moves and outside the ``frozen`` grid boxes."""
        keep = 1 - moving
        for x0, y0, x1, y1 in frozen:
            keep[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = 0
        cv2.accumulateWeighted(small, self.bg, BG_RATE, mask=keep)


@dataclass
class Candidate:
    """A product candidate: a box on the motion grid (x1/y1 exclusive) and whether it was cut from a bigger blob."""

    box: tuple[int, int, int, int]
    split: bool = False


class LengthEstimate:
    """Product length along the travel (grid px) of one lane: a param, or learnt from separate blobs."""

    def __init__(self, fixed_px: float | None = None):
        self.fixed = fixed_px
        self.samples: deque[float] = deque(maxlen=LENGTH_SAMPLES)

    def add(self, length: float) -> None:
        self.samples.append(length)

    def value(self) -> float | None:
        if self.fixed is not None:
            return self.fixed
        if len(self.samples) < LENGTH_MIN_SAMPLES:
            return None
        return float(np.percentile(self.samples, LENGTH_QUANTILE))


def _cuts(proj: np.ndarray, length: float, free_end: int) -> list[float]:
    """Cut positions (in projection units from the blob's start) for a blob of projected pixels ``proj``.

    ``free_end``: 0 = the start is fully visible (cut from there), 1 = the end is, 2 = both (equal parts).
    """
    span = float(proj.max()) + 1
    if free_end == 2:
        n = max(1, int(round(span / length)))
        nominal = [span * k / n for k in range(1, n)]
    else:
        k_full = int((span - MIN_PIECE * length) // length)
        steps = [length * k for k in range(1, k_full + 1) if length * k < span - MIN_PIECE * length]
        nominal = steps if free_end == 0 else [span - s for s in reversed(steps)]
    profile = np.bincount(proj.astype(np.int64), minlength=int(span)).astype(np.float32)
    profile = np.convolve(profile, np.array([1, 2, 1], np.float32) / 4, mode="same")
    cuts = []
    reach = CUT_SEARCH * length
    for c in nominal:
        lo, hi = max(1, int(round(c - reach))), min(len(profile) - 1, int(round(c + reach)))
        cuts.append(float(lo + int(np.argmin(profile[lo:hi + 1]))) if hi > lo else c)
    return cuts


def find_candidates(moving: np.ndarray, lane_mask: np.ndarray, edge_mask: np.ndarray, min_px: float,
                    direction: np.ndarray | None, lengths: LengthEstimate) -> list[Candidate]:
    """Candidates of one lane: blobs of ``moving`` inside ``lane_mask``; long blobs cut into products.

    ``edge_mask``: the lane's border band (a blob touching it is entering or leaving the view: its
    length is not a product's, and it is cut from its other end). Separate blobs feed ``lengths``.
    """
    m = moving & lane_mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    out: list[Candidate] = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_px:
            continue
        if direction is None:
            out.append(Candidate((x, y, x + w, y + h)))
            continue
        ys, xs = np.nonzero(labels[y:y + h, x:x + w] == i)
        proj = xs * direction[0] + ys * direction[1]
        pmin = proj.min()
        proj = proj - pmin
        touching = edge_mask[y + ys, x + xs].astype(bool)
        length = lengths.value()
        span = float(proj.max()) + 1
        if not touching.any():
            lengths.add(span)
        if length is None or span < SPLIT_AT * length:
            out.append(Candidate((x, y, x + w, y + h)))
            continue
        if not touching.any():
            free_end = 2
        else:                              # cut from the end away from the lane edge it touches
            free_end = 0 if proj[touching].mean() > span / 2 else 1
        edges = [0.0, *_cuts(proj, length, free_end), span]
        for a, b in zip(edges[:-1], edges[1:]):
            sel = (proj >= a) & (proj < b)
            if sel.any():
                px, py = xs[sel], ys[sel]
                out.append(Candidate((x + int(px.min()), y + int(py.min()), x + int(px.max()) + 1,
                                      y + int(py.max()) + 1), split=len(edges) > 2))
    return out


def edge_band(lane_mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The lane's border band (inside the lane, ``width`` px), also where the lane meets the grid's edge."""
    padded = cv2.copyMakeBorder(lane_mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    inner = cv2.erode(padded, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * width + 1,) * 2))[1:-1, 1:-1]
    return (lane_mask & (1 - inner)).astype(np.uint8)
