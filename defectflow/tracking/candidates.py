"""Product candidates per frame: foreground blobs against a running background, split where
touching products form one blob.

The background starts as the per-pixel most frequent grey level of the first frames (robust when
products cover the belt most of the time, unlike a median: see :func:`mode_background`), then follows slow light changes where
nothing moves, and slowly absorbs what differs but is no travelling product (a product stopped on
the belt, whose track has travelled, stays foreground; a thing left standing fades in). A blob longer
than about 1.5 product lengths along the direction of travel is cut into products: at multiples
of the product length from its fully visible end (equal parts when both ends are visible; at the
phase that puts the cuts on the thinnest cross-sections when it runs across the whole lane), each
cut moved to the thinnest cross-section nearby (the gap or neck between two products, if clear). The product length is
``frames.product_length`` or learnt from the blobs that touch no lane end (:class:`LengthEstimate`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from defectflow.config import FramesParams

BG_RATE = 0.05               # running background update where nothing moves and nothing is tracked
GHOST_RATE = 0.01            # ... where something differs from it but no travelling track covers it
MIN_FREE = 3                 # frames a pixel must be free of products in to take its background from them
MODE_SHARE = 0.3             # the starting background: the belt shows in at least this share of the first frames
SPLIT_AT = 1.5               # a blob this many product lengths long (or more) is cut
CUT_SEARCH = 0.25            # a cut moves to the thinnest cross-section within this share of a length,
PHASE_SEARCH = 0.3           # a blob with one visible end: its cut phase within this share of a length of that end's
NECK_DEPTH = 0.8             # ... if it is this much thinner than at the nominal cut (else: a flat side)
MIN_PIECE = 0.35             # a piece shorter than this share of a length (at a lane edge) joins its neighbour
LENGTH_SAMPLES = 200         # lengths of separate blobs remembered per lane
LENGTH_MIN_SAMPLES = 12      # no estimate from fewer
LENGTH_REFRESH = 32          # the estimate is refreshed every this many new samples
LENGTH_QUANTILE = 20


def mode_background(smalls: list[np.ndarray]) -> np.ndarray:
    """Per-pixel most frequent value of float frames: the mean of the tightest MODE_SHARE of each
    pixel's values (the shortest window of its sorted values), right while the belt shows in at least
    that share of the frames, where a median needs half."""
    stack = np.sort(np.stack(smalls), axis=0)
    n = len(stack)
    k = max(1, min(n, int(np.ceil(MODE_SHARE * n))))
    widths = stack[k - 1:] - stack[:n - k + 1]
    start = widths.argmin(axis=0)
    csum = np.concatenate([np.zeros((1,) + stack.shape[1:], np.float32), np.cumsum(stack, axis=0)])
    total = np.take_along_axis(csum, (start + k)[None], 0)[0] - np.take_along_axis(csum, start[None], 0)[0]
    return (total / k).astype(np.float32)


def masked_background(smalls: list[np.ndarray], covers: list[np.ndarray], fallback: np.ndarray) -> np.ndarray:
    """Per-pixel median of the frames where ``covers`` (0/1, one per frame) leaves the pixel free;
    ``fallback`` where fewer than MIN_FREE frames do."""
    keyed = np.stack([np.clip(np.round(s), 0, 255) for s in smalls]).astype(np.uint16)
    cov = np.stack(covers).astype(bool)
    keyed[cov] += 256                                  # covered samples sort after every free one
    keyed.sort(axis=0)
    n_free = (~cov).sum(axis=0)
    med = np.take_along_axis(keyed, np.maximum((n_free - 1) // 2, 0)[None], axis=0)[0].astype(np.float32)
    return np.where(n_free >= MIN_FREE, med, fallback).astype(np.float32)


class BackgroundModel:
    """Running grey background on the motion grid; ``moving`` marks what differs from it."""

    def __init__(self, scale: float, fp: FramesParams):
        self.threshold = float(fp.motion_threshold)
        shake = int(math.ceil(fp.shake_px * scale)) if fp.shake_px else 0
        self._shake = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * shake + 1,) * 2) if shake else None
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))   # bridges 1-px cracks, not gaps
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
        """Blend ``small`` into the background outside the ``frozen`` grid boxes (products that travelled):
        at BG_RATE where nothing moves, at GHOST_RATE where something differs but no travelling track is
        (a product left standing, a ghost of one that stood there while the background started)."""
        free = np.ones_like(moving)
        for x0, y0, x1, y1 in frozen:
            free[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = 0
        cv2.accumulateWeighted(small, self.bg, BG_RATE, mask=free & (1 - moving))
        cv2.accumulateWeighted(small, self.bg, GHOST_RATE, mask=free & moving)


@dataclass
class Candidate:
    """A product candidate: a box on the motion grid (x1/y1 exclusive) and whether it was cut from a bigger blob."""

    box: tuple[int, int, int, int]
    split: bool = False


class LengthEstimate:
    """Product length along the travel (grid px) of one lane: a param, or learnt from separate blobs.

    The learnt length is the LENGTH_QUANTILE-th percentile of the separate blobs' lengths, each
    weighted by its area: fragments of a product (a label that matches the belt cut one in two)
    weigh little, so the estimate stays on whole products.
    """

    def __init__(self, fixed_px: float | None = None):
        self.fixed = fixed_px
        self.samples: deque[tuple[float, float]] = deque(maxlen=LENGTH_SAMPLES)
        self._value: float | None = None
        self._added = 0

    def add(self, length: float, area: float) -> None:
        self.samples.append((length, area))
        self._added += 1
        if len(self.samples) >= LENGTH_MIN_SAMPLES and (self._value is None or self._added >= LENGTH_REFRESH):
            lengths, areas = np.array(self.samples).T
            order = np.argsort(lengths)
            cum = np.cumsum(areas[order])
            k = int(np.searchsorted(cum, LENGTH_QUANTILE / 100 * cum[-1]))
            self._value, self._added = float(lengths[order][min(k, len(order) - 1)]), 0

    def value(self) -> float | None:
        return self.fixed if self.fixed is not None else self._value


def _cuts(profile: np.ndarray, length: float, free_end: int) -> list[int]:
    """Cut positions along a blob's cross-section ``profile`` (pixels per step along the travel).

    ``free_end``: 0 = the start is fully visible (cut from there at multiples of ``length``), 1 = the
    end is, 2 = both (equal parts), 3 = neither (the blob runs across the lane: multiples of
    ``length`` at the phase whose cuts fall on the thinnest cross-sections). Each cut then moves to
    the thinnest smoothed cross-section within CUT_SEARCH of a length, if that is clearly thinner
    (NECK_DEPTH) than at the nominal cut: two flat sides touching have no neck.
    """
    span = len(profile)
    smooth = np.convolve(profile.astype(np.float32), np.array([1, 2, 1], np.float32) / 4, mode="same")
    if free_end == 2:
        n = max(1, int(round(span / length)))
        nominal = [span * k / n for k in range(1, n)]
    else:
        # multiples of the length at the phase whose cuts fall on the thinnest cross-sections: any phase
        # for a blob across the lane, near the fully visible end's phase otherwise (that end may have
        # lost a shaded edge to the background, so it only anchors the search)
        anchor = 0.0 if free_end == 0 else (span % length if free_end == 1 else None)
        phases = np.arange(0.0, length, 1.0)
        if anchor is not None:
            off = (phases - anchor + length / 2) % length - length / 2
            phases = phases[np.abs(off) <= PHASE_SEARCH * length]
        grid = phases[:, None] + length * np.arange(int(span // length) + 1)[None, :]    # (phases, cuts)
        valid = (grid >= MIN_PIECE * length) & (grid <= span - MIN_PIECE * length)
        at = np.clip(np.round(grid).astype(int), 0, span - 1)
        counts = valid.sum(axis=1)
        score = np.where(counts > 0, (smooth[at] * valid).sum(axis=1) / np.maximum(counts, 1), np.inf)
        best = int(np.argmin(score)) if len(score) else -1
        nominal = list(grid[best][valid[best]]) if best >= 0 and np.isfinite(score[best]) else []
    reach = CUT_SEARCH * length
    cuts = []
    for c in nominal:
        at = min(max(int(round(c)), 1), span - 1)
        lo, hi = max(1, int(round(c - reach))), min(span - 1, int(round(c + reach)))
        best_at = lo + int(np.argmin(smooth[lo:hi + 1])) if hi > lo else at
        cuts.append(best_at if smooth[best_at] < NECK_DEPTH * smooth[at] else at)     # a real gap or neck only
    return sorted(set(cuts))


def _free_end(touch_pos: np.ndarray, span: int) -> int:
    """Which end of a blob is fully visible, from the positions (along the travel) of its pixels on a lane end."""
    if not len(touch_pos):
        return 2
    low, high = bool((touch_pos < span / 2).any()), bool((touch_pos >= span / 2).any())
    return 3 if low and high else (0 if high else 1)


def find_candidates(moving: np.ndarray, lane_mask: np.ndarray, end_mask: np.ndarray | None, min_px: float,
                    direction: np.ndarray | None, lengths: LengthEstimate) -> list[Candidate]:
    """Candidates of one lane: blobs of ``moving`` inside ``lane_mask``; long blobs cut into products.

    ``end_mask``: the lane's ends (:func:`end_band`; a blob touching one is entering or leaving the
    view: its length is not a product's, and it is cut from its other end). Separate blobs feed
    ``lengths``. ``direction`` None (not known yet): blobs as they are.
    """
    m = moving & lane_mask
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)   # 6x faster than labelling
    out: list[Candidate] = []
    length = lengths.value()
    axis = None if direction is None else (0 if abs(direction[0]) > 0.999 else 1 if abs(direction[1]) > 0.999 else None)
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if w * h < min_px or cv2.contourArea(c) + (w + h) < min_px:    # + about half the outline: the pixel count
            continue
        box = (x, y, x + w, y + h)
        if direction is None:
            out.append(Candidate(box))
            continue
        touch = end_mask[y:y + h, x:x + w] & m[y:y + h, x:x + w]
        touching = bool(touch.any())
        if axis is not None:                       # travel along x or y: the box gives the length
            span = float(w if axis == 0 else h)
        else:
            proj = c[:, 0] @ direction
            span = float(proj.max() - proj.min()) + 1
        if not touching:
            lengths.add(span, float(w * h))
        if length is None or span < SPLIT_AT * length:
            out.append(Candidate(box))
            continue
        sub = np.zeros((h, w), np.uint8)
        cv2.drawContours(sub, [c], -1, 1, -1, offset=(-x, -y))
        sub &= m[y:y + h, x:x + w]
        out += _split(sub.astype(bool), x, y, direction, axis, length, (touch & sub).astype(bool))
    return out


def _split(sub: np.ndarray, x: int, y: int, direction: np.ndarray, axis: int | None, length: float,
           touch: np.ndarray) -> list[Candidate]:
    """Cut one blob (``sub``: its pixels in its box at x, y) into products along the travel."""
    if axis is not None:                           # along columns (x travel) or rows (y travel)
        along = sub if axis == 0 else sub.T
        profile = along.sum(axis=0)
        free_end = _free_end(np.nonzero((touch if axis == 0 else touch.T).any(axis=0))[0], len(profile))
        edges = [0, *_cuts(profile, length, free_end), len(profile)]
        out = []
        for a, b in zip(edges[:-1], edges[1:]):
            across = np.nonzero(along[:, a:b].any(axis=1))[0]
            if len(across):
                lo, hi = int(across[0]), int(across[-1]) + 1
                piece = (x + a, y + lo, x + b, y + hi) if axis == 0 else (x + lo, y + a, x + hi, y + b)
                out.append(Candidate(piece, split=len(edges) > 2))
        return out
    ys, xs = np.nonzero(sub)                       # a diagonal belt: project every pixel
    proj = np.floor(xs * direction[0] + ys * direction[1]).astype(np.int64)
    proj -= proj.min()
    profile = np.bincount(proj)
    free_end = _free_end(proj[touch[ys, xs]], len(profile))
    edges = [0, *_cuts(profile, length, free_end), len(profile)]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (proj >= a) & (proj < b)
        if sel.any():
            px, py = xs[sel], ys[sel]
            out.append(Candidate((x + int(px.min()), y + int(py.min()), x + int(px.max()) + 1, y + int(py.max()) + 1),
                                 split=len(edges) > 2))
    return out


def end_band(lane_mask: np.ndarray, polygon: np.ndarray, direction: np.ndarray, width: int = 2) -> np.ndarray:
    """The lane's ends (``polygon`` in grid px): a ``width`` px band inside the lane along the polygon
    edges that run across ``direction`` (where products enter and leave), 0/1 uint8."""
    band = np.zeros_like(lane_mask)
    pts = np.round(polygon * 16).astype(np.int32)
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        t = (b - a).astype(np.float64)
        norm = float(np.hypot(*t))
        if norm > 0 and abs(t @ direction) / norm < 0.7:
            cv2.line(band, tuple(int(v) for v in a), tuple(int(v) for v in b), 1, 2 * width + 1, cv2.LINE_8, 4)
    return band & lane_mask
