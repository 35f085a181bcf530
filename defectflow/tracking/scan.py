"""One video's products: background, candidates, a tracker per lane, the window of each capture.

Feed every frame in order (``small``: the grey motion image, given on the tracked frames only,
``t % stride == 0``). The first ``BG_FRAMES`` tracked frames are held (at most
``BG_BUFFER_BYTES``) while the background starts, then replayed. Captures come back once their
window is complete and their track has ended with a count that stands. Also kept per video: a log
of every track's box at every update (for annotated videos and checks) and a colour background
plate (per-pixel median of frames sampled over the video, each pixel only from the samples where
no track and no motion covered it: right even when products cover the belt most of the time).
"""
from __future__ import annotations

import warnings
from collections import deque

import cv2
import numpy as np

from defectflow.config import FramesParams
from defectflow.tracking.candidates import BackgroundModel, LengthEstimate, edge_band, find_candidates
from defectflow.tracking.lanes import Grid, Lane
from defectflow.tracking.tracker import Capture, LaneTracker
from defectflow.video_decode import Payload, nbytes

BG_FRAMES = 40               # the background starts from this many tracked frames
BG_BUFFER_BYTES = 64 << 20   # cap on frames held while the background starts
PLATE_SAMPLES = 25           # frames sampled over the video for the colour background plate
PLATE_BYTES = 192 << 20      # cap on the plate samples held
PLATE_COVER_MARGIN = 0.15    # track boxes grown by this share of their size when masking the plate samples
RING_STRIDES = 4             # the crossing frame may lie this many strides back (a track matched late)


class VideoTracker:
    """Tracks the products of one video (see the module docstring)."""

    def __init__(self, lanes: list[Lane], grid: Grid, fp: FramesParams, frame_shape: tuple[int, ...],
                 expected_frames: int = 0):
        self.lanes, self.grid, self.stride = lanes, grid, fp.stride
        self.bg = BackgroundModel(grid.scale, fp)
        self.trackers = [LaneTracker(ln, fp.stride, fp.max_lost_frames, fp.min_pass_frames, fp.min_travel)
                         for ln in lanes]
        self.lengths = [LengthEstimate() for _ in lanes]
        self.edges = [edge_band(m) for m in grid.masks]
        self.min_px = [fp.min_area * float(m.sum()) for m in grid.masks]
        self.before, self.after = (fp.window - 1) // 2, fp.window // 2
        self.ring: deque[tuple[int, Payload]] = deque(maxlen=self.before + RING_STRIDES * fp.stride + 1)
        self.open: list[Capture] = []
        self.log: list[tuple] = []
        self.started = False
        self.held: list[tuple[int, Payload, np.ndarray | None]] = []
        self.held_bytes = 0
        self.shape = frame_shape[:2]
        frame_bytes = int(np.prod(frame_shape[:2])) * 3
        self.max_samples = max(5, min(PLATE_SAMPLES, PLATE_BYTES // max(frame_bytes, 1)))
        every = expected_frames // self.max_samples if expected_frames else 10 * fp.stride
        self.sample_every = max(fp.stride, every - every % fp.stride)
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []

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
        n_small = sum(s is not None for _, _, s in self.held)
        if n_small >= BG_FRAMES or self.held_bytes >= BG_BUFFER_BYTES:
            return self._start()
        return []

    def _start(self) -> list[Capture]:
        smalls = [s for _, _, s in self.held if s is not None]
        self.started = True
        if not smalls:
            self.held = []
            return []
        self.bg.start(smalls)
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
            self._track(t, small, payload)
        for cap in self.open:
            if cap.center < t <= cap.center + self.after:
                cap.frames[t] = payload
        done = [c for c in self.open if c.valid and t >= c.center + self.after]
        if done:
            self.open = [c for c in self.open if c not in done]
        return done

    def _track(self, t: int, small: np.ndarray, payload: Payload) -> None:
        moving = self.bg.moving(small)
        for k, lt in enumerate(self.trackers):
            d = lt.direction()
            lengths = self.lengths[k]
            if lt.lane.product_length is not None and d is not None:
                lengths.fixed = lt.lane.product_length * lt.lane.extent(d) * self.grid.scale
            cands = find_candidates(moving, self.grid.masks[k], self.edges[k], self.min_px[k], d, lengths)
            for cap in lt.update(t, [self.grid.to_frame(c.box) for c in cands]):
                lo = max(cap.center, t - RING_STRIDES * self.stride) - self.before
                cap.frames = {i: f for i, f in self.ring if i >= lo}
                cap.center = max(cap.center, t - RING_STRIDES * self.stride)
                self.open.append(cap)
            for tid, tr in lt.tracks.items():
                if t in tr.history:
                    self.log.append((t, lt.lane.name, tid, *tr.history[t]))
            self._ended(lt)
        frozen = [self.grid.to_grid(b) for lt in self.trackers for b in lt.frozen_boxes()]
        self.bg.update(small, moving, frozen)
        if t % self.sample_every == 0:
            self._sample(payload, moving)

    def _ended(self, lt: LaneTracker) -> None:
        for cap, ok in lt.ended():
            if cap is not None and not ok:
                self.open = [c for c in self.open if c is not cap]

    # ------------------------------------------------------------------ background plate

    def _sample(self, payload: Payload, moving: np.ndarray) -> None:
        frame = payload if isinstance(payload, np.ndarray) else cv2.imdecode(
            np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if frame is None or frame.shape[:2] != self.shape:
            return
        h, w = self.shape
        cover = np.zeros((h, w), np.uint8)
        g = self.grid
        grown = cv2.dilate(moving, np.ones((3, 3), np.uint8))
        cover[g.y0:g.y1, g.x0:g.x1] = cv2.resize(grown, (g.x1 - g.x0, g.y1 - g.y0), interpolation=cv2.INTER_NEAREST)
        for lt in self.trackers:
            for x0, y0, x1, y1 in lt.frozen_boxes():
                mx, my = PLATE_COVER_MARGIN * (x1 - x0), PLATE_COVER_MARGIN * (y1 - y0)
                cv2.rectangle(cover, (int(x0 - mx), int(y0 - my)), (int(x1 + mx), int(y1 + my)), 1, -1)
        self.samples.append((frame.copy(), cover.astype(bool)))
        if len(self.samples) > 2 * self.max_samples:        # length unknown or misreported: thin out
            self.samples = self.samples[::2]
            self.sample_every *= 2

    def plate(self) -> np.ndarray | None:
        """Colour background plate: per pixel, the median of the samples that did not cover it."""
        if not self.samples:
            return None
        frames = np.stack([f for f, _ in self.samples])
        covers = np.stack([c for _, c in self.samples])
        out = np.empty(frames.shape[1:], np.uint8)
        for y in range(0, frames.shape[1], 32):                      # row bands: bounded float memory
            f = frames[:, y:y + 32].astype(np.float32)
            c = covers[:, y:y + 32]
            free = np.where(c[..., None], np.nan, f)
            none_free = c.all(axis=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)          # all-NaN pixels: filled below
                med = np.nanmedian(free, axis=0)
            med[none_free] = np.median(f, axis=0)[none_free]
            out[y:y + 32] = np.clip(np.round(med), 0, 255).astype(np.uint8)
        return out

    # ------------------------------------------------------------------ summary

    @property
    def n_tracks(self) -> int:
        return sum(lt.n_tracks for lt in self.trackers)

    @property
    def n_rejected(self) -> int:
        return sum(lt.n_rejected for lt in self.trackers)
