"""One video's products: background, candidates, a tracker per lane, the window of each capture.

Feed every frame in order (``small``: the grey motion image, given on the tracked frames only,
``t % stride == 0``). The first ``BG_FRAMES`` tracked frames are held (at most
``BG_BUFFER_BYTES``) while the background starts; a first pass over every ``LEARN_STEP``-th of them
learns the direction of travel and the product length (so the first products are split and counted
like the others) and which pixels products covered (the background restarts from the others), then
they are replayed. Captures come back once their
window is complete and their track has ended with a count that stands. Also kept: a log of every
track's box at every update (for the detect stage's background plate, annotated videos, checks).
"""
from __future__ import annotations

from collections import deque

import cv2

import numpy as np

from defectflow.config import FramesParams
from defectflow.tracking.candidates import (BackgroundModel, LengthEstimate, end_band, find_candidates,
                                            masked_background)
from defectflow.tracking.lanes import Grid, Lane
from defectflow.tracking.tracker import Capture, LaneTracker
from defectflow.video_decode import Payload, nbytes

BG_FRAMES = 100              # the warm-up pass runs on this many tracked frames (direction, product length)
LEARN_STEP = 2               # the learning pass (belt tracker) takes every 2nd of them
MIN_PHASE_RESPONSE = 0.05    # ... and trusts a phase correlation of the foreground above this response
BG_SAMPLES = 40              # ... of which this many, evenly spread, give the first background (the mode)
BG_BUFFER_BYTES = 64 << 20   # cap on frames held while the background starts
RING_STRIDES = 4             # the crossing frame may lie this many strides back (a track matched late)


class VideoTracker:
    """Tracks the products of one video (see the module docstring)."""

    def __init__(self, lanes: list[Lane], grid: Grid, fp: FramesParams):
        self.lanes, self.grid, self.stride = lanes, grid, fp.stride
        self.bg = BackgroundModel(grid.scale, fp)
        self.trackers = [LaneTracker(ln, fp.stride, fp.max_lost_frames, fp.min_pass_frames, fp.min_travel,
                                     fp.tracker) for ln in lanes]
        self.lengths = [LengthEstimate() for _ in lanes]
        self.ends: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(lanes)   # (direction, band)
        self.min_px = [fp.min_area * float(m.sum()) for m in grid.masks]
        self.before, self.after = (fp.window - 1) // 2, fp.window // 2
        self.ring: deque[tuple[int, Payload]] = deque(maxlen=self.before + RING_STRIDES * fp.stride + 1)
        self.open: list[Capture] = []
        self.log: list[tuple] = []
        self.started = False
        self.held: list[tuple[int, Payload, np.ndarray | None]] = []
        self.held_bytes = 0
        self.held_smalls = 0

    def wants(self, t: int) -> bool:
        """Whether frame ``t`` is a tracked frame (give its motion image to :meth:`feed`)."""
        return t % self.stride == 0

    # ------------------------------------------------------------------ feeding

    def feed(self, t: int, payload: Payload, small: np.ndarray | None) -> list[Capture]:
        """Add frame ``t``; return the captures completed."""
        if self.started:
            return self._step(t, payload, small)
        self.held.append((t, payload, small))
        self.held_bytes += nbytes(payload)
        self.held_smalls += small is not None
        if self.held_smalls >= BG_FRAMES or self.held_bytes >= BG_BUFFER_BYTES:
            return self._start()
        return []

    def _start(self) -> list[Capture]:
        """Start the background on the held frames, learn direction and product length on them
        (a first pass whose tracks are dropped), restart the background from the held frames with
        that pass's product boxes masked out, then replay them."""
        smalls = [s for _, _, s in self.held if s is not None]
        self.started = True
        if not smalls:
            self.held = []
            return []
        pick = np.unique(np.linspace(0, len(smalls) - 1, min(len(smalls), BG_SAMPLES)).round().astype(int))
        self.bg.start([smalls[i] for i in pick])
        start_bg = self.bg.bg.copy()
        self.covers = []
        learn = [(t, small) for t, _, small in self.held if small is not None]
        step = LEARN_STEP if all(hasattr(lt.tracker, "belt") for lt in self.trackers) else 1
        prev = None
        for t, small in learn[::step]:
            if step > 1 and prev is not None:
                self._seed_belt_motion(prev, small)
            self._track(t, small, learning=True)
            prev = small
        for lt in self.trackers:
            lt.restart()
        self.bg.bg = masked_background([s for _, s in learn[::step]], self.covers, start_bg)
        self.covers = []
        self.open, self.log = [], []
        held, self.held = self.held, []
        done = []
        for t, payload, small in held:
            done += self._step(t, payload, small)
        return done

    def flush(self) -> list[Capture]:
        """End of video: every track ends; the valid captures still collecting frames come back."""
        done = [] if self.started else self._start()
        for lt in self.trackers:
            lt.flush()
            self._ended(lt)
        done += [c for c in self.open if c.valid]
        self.open = []
        return done

    def _step(self, t: int, payload: Payload, small: np.ndarray | None) -> list[Capture]:
        self.ring.append((t, payload))
        if small is not None:
            self._track(t, small)
        for cap in self.open:
            if cap.center < t <= cap.center + self.after:
                cap.frames[t] = payload
        done = [c for c in self.open if c.valid and t >= c.center + self.after]
        if done:
            self.open = [c for c in self.open if c not in done]
        return done

    def _track(self, t: int, small: np.ndarray, learning: bool = False) -> None:
        """One tracked frame: candidates per lane, tracker updates, captures; ``learning``: the first
        pass over the held frames (captures and log dropped)."""
        moving = self.bg.moving(small)
        cover = np.zeros_like(moving) if learning else None
        for k, lt in enumerate(self.trackers):
            d = lt.direction()
            lengths = self.lengths[k]
            if lt.lane.product_length is not None and d is not None:
                lengths.fixed = lt.lane.product_length * lt.lane.extent(d) * self.grid.scale
            cands = find_candidates(moving, self.grid.masks[k], self._ends(k, d), self.min_px[k], d, lengths)
            started = lt.update(t, [self.grid.to_frame(c.box) for c in cands], d)
            if learning:
                for c in cands:
                    x0, y0, x1, y1 = c.box
                    cover[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 1
                lt.ended()
                continue
            for cap in started:
                cap.center = max(cap.center, t - RING_STRIDES * self.stride)     # the ring reaches this far
                cap.frames = {i: f for i, f in self.ring
                              if cap.center - self.before <= i <= cap.center + self.after}
                self.open.append(cap)
            for tid, tr in lt.tracks.items():
                if t in tr.history:
                    self.log.append((t, lt.lane.name, tid, *tr.history[t]))
            self._ended(lt)
        if learning:
            self.covers.append(cover)
        frozen = [self.grid.to_grid(b) for lt in self.trackers for b in lt.frozen_boxes()]
        self.bg.update(small, moving, frozen)

    def _seed_belt_motion(self, prev: np.ndarray, small: np.ndarray) -> None:
        """Each lane's belt motion between two learning frames, by phase correlation of their foreground
        (what differs from the background), as the velocity new tracks start with: the learning pass
        skips frames, so a product moves up to its own length between them."""
        for k, lt in enumerate(self.trackers):
            ys, xs = np.nonzero(self.grid.masks[k])
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            a = np.abs(prev[y0:y1, x0:x1] - self.bg.bg[y0:y1, x0:x1]) * self.grid.masks[k][y0:y1, x0:x1]
            b = np.abs(small[y0:y1, x0:x1] - self.bg.bg[y0:y1, x0:x1]) * self.grid.masks[k][y0:y1, x0:x1]
            (dx, dy), response = cv2.phaseCorrelate(a.astype(np.float64), b.astype(np.float64))
            if response > MIN_PHASE_RESPONSE:
                dx, dy = dx / self.grid.scale, dy / self.grid.scale
                lt.tracker.belt = [dx, dy, dx, dy]

    def _ends(self, k: int, d: np.ndarray | None) -> np.ndarray | None:
        """Lane k's end band for direction ``d`` (redrawn when the direction turned by over 10 degrees)."""
        if d is None:
            return None
        cached = self.ends[k]
        if cached is None or float(cached[0] @ d) < 0.985:
            poly = (self.lanes[k].polygon - (self.grid.x0, self.grid.y0)) * self.grid.scale
            self.ends[k] = (d.copy(), end_band(self.grid.masks[k], poly, d))
        return self.ends[k][1]

    def _ended(self, lt: LaneTracker) -> None:
        for cap, ok in lt.ended():
            if cap is not None and not ok:
                self.open = [c for c in self.open if c is not cap]

    # ------------------------------------------------------------------ summary

    @property
    def n_tracks(self) -> int:
        return sum(lt.n_tracks for lt in self.trackers)

    @property
    def n_rejected(self) -> int:
        return sum(lt.n_rejected for lt in self.trackers)
