"""Tracks per lane and the counting line.

Each lane's candidate boxes go to an association backend (``frames.tracker``, see
``association.py``); a track is one product. It is counted once, at its first crossing of the
lane's counting line in the direction of travel (its centre's signed distance to the line goes
from < 0 to >= 0); the crossing frame is interpolated between tracker updates. Whether the count
stands is decided when the track ends: it must have lived ``frames.min_pass_frames`` frames and
moved along the travel across ``frames.min_travel`` of the lane, and its crossing must agree with
the final direction. A product that stops, reverses a little and goes on keeps its track and is
not counted again; one that leaves before the line (or a hand reaching in) is never counted.

The direction of travel is the lane's (``direction`` param) or, for ``auto``, the sum of every
track's displacement in the lane so far (known once tracks have moved a tenth of the lane).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from defectflow.tracking.association import BACKENDS
from defectflow.tracking.lanes import Lane

FREEZE_TRAVEL = 0.25         # a track freezes the background under it once it moved this share of its size
AUTO_MIN_TRAVEL = 0.1        # auto direction: known once the tracks moved this share of the lane's diagonal

Box = tuple[float, float, float, float]


def _centre(box: Box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


@dataclass
class Capture:
    """A counted product: its track, the frame nearest the crossing and the window of frames around it."""

    lane: str
    track_id: int
    center: int
    frames: dict = field(default_factory=dict)       # frame index -> payload (filled by the caller)
    normal: np.ndarray | None = None                 # the line's normal when it was crossed
    boxes: dict[int, Box] = field(default_factory=dict)   # update frame -> track box (frame px), at the end
    valid: bool | None = None                        # decided when the track ends
    index: int = -1

    def box_at(self, t: int) -> Box:
        """The track's box at frame ``t``, interpolated between updates (the nearest one outside them)."""
        keys = sorted(self.boxes)
        if t in self.boxes or not keys:
            return self.boxes.get(t, (0.0, 0.0, 0.0, 0.0))
        arr = np.array([self.boxes[k] for k in keys])
        return tuple(float(np.interp(t, keys, arr[:, j])) for j in range(4))


@dataclass
class _Track:
    first_t: int
    first_pos: np.ndarray
    last_t: int = -1
    last_pos: np.ndarray | None = None
    history: dict[int, Box] = field(default_factory=dict)   # update frame -> box (measured, else predicted)
    positions: list[np.ndarray] = field(default_factory=list)   # measured centres
    capture: Capture | None = None


class LaneTracker:
    """One lane's tracker: feed candidate boxes (frame px) every update; get captures back."""

    def __init__(self, lane: Lane, stride: int, max_lost_frames: int, min_pass_frames: int, min_travel: float,
                 backend: str = "belt"):
        self.lane = lane
        self.backend = BACKENDS[backend]
        self.stride = stride
        self.min_pass_frames, self.min_travel = min_pass_frames, min_travel
        self.lost_updates = max(1, math.ceil(max_lost_frames / stride))
        self.done_motion = np.zeros(2)               # summed displacement of ended tracks
        self.restart()
        diag = np.ptp(lane.polygon, axis=0)
        self.auto_min = AUTO_MIN_TRAVEL * float(np.hypot(*diag))

    def restart(self) -> None:
        """A fresh tracker (no tracks, counts at 0); the motion learnt so far (auto direction) is kept."""
        for tr in getattr(self, "tracks", {}).values():
            if tr.last_pos is not None:
                self.done_motion += tr.last_pos - tr.first_pos
        self.tracker = self.backend(self.lost_updates)
        self.tracks: dict[int, _Track] = {}
        self.finished: list[tuple[_Track, int]] = []
        self.n_tracks = 0
        self.n_rejected = 0

    # ------------------------------------------------------------------ direction

    def direction(self) -> np.ndarray | None:
        """Unit vector of travel: the lane's, or estimated from the tracks' motion (None: not yet)."""
        if self.lane.direction is not None:
            return self.lane.direction
        total = self.done_motion + sum((tr.last_pos - tr.first_pos for tr in self.tracks.values()
                                        if tr.last_pos is not None), np.zeros(2))
        norm = float(np.hypot(*total))
        return total / norm if norm >= self.auto_min else None

    # ------------------------------------------------------------------ updates

    def update(self, t: int, boxes: list[Box], d: np.ndarray | None = None) -> list[Capture]:
        """Tracker update at frame ``t`` (``d``: :meth:`direction`, if the caller has it); returns the
        captures started (tracks crossing the line now)."""
        alive = set()
        started = []
        d = self.direction() if d is None else d
        for tid, box, measured in self.tracker.update(boxes):
            alive.add(tid)
            pos = _centre(box)
            tr = self.tracks.get(tid)
            if tr is None:
                tr = self.tracks[tid] = _Track(first_t=t, first_pos=pos)
                self.n_tracks += 1
            tr.history[t] = box
            if not measured:
                continue
            if d is not None and tr.capture is None and tr.last_pos is not None:
                cap = self._crossing(tid, tr, t, pos, d)
                if cap is not None:
                    tr.capture = cap
                    started.append(cap)
            tr.last_t, tr.last_pos = t, pos
            tr.positions.append(pos)
        for tid in [k for k in self.tracks if k not in alive]:
            self._end(tid)
        return started

    def _crossing(self, tid: int, tr: _Track, t: int, pos: np.ndarray, d: np.ndarray) -> Capture | None:
        point, normal = self.lane.line_normal(d)
        s0, s1 = float((tr.last_pos - point) @ normal), float((pos - point) @ normal)
        if not (s0 < 0 <= s1 or s0 <= 0 < s1):          # (on the line exactly, by either estimate of it)
            return None
        frac = -s0 / (s1 - s0) if s1 > s0 else 1.0
        centre = int(round(tr.last_t + frac * (t - tr.last_t)))
        return Capture(self.lane.name, tid, centre, normal=normal)

    def _end(self, tid: int) -> None:
        tr = self.tracks.pop(tid)
        if tr.last_pos is not None:
            self.done_motion += tr.last_pos - tr.first_pos
        self.finished.append((tr, tid))

    def flush(self) -> None:
        """End of video: every track ends."""
        for tid in list(self.tracks):
            self._end(tid)

    def frozen_boxes(self) -> list[Box]:
        """Current boxes of the live tracks that have travelled (a quarter of their size or more): the
        background is not updated under them, so a product that stops on the belt stays foreground."""
        out = []
        for tr in self.tracks.values():
            if tr.history and tr.last_pos is not None:
                box = tr.history[max(tr.history)]
                if float(np.hypot(*(tr.last_pos - tr.first_pos))) >= FREEZE_TRAVEL * max(box[2] - box[0], box[3] - box[1]):
                    out.append(box)
        return out

    def live_captures(self) -> list[Capture]:
        return [tr.capture for tr in self.tracks.values() if tr.capture is not None]

    def ended(self) -> list[tuple[Capture | None, bool]]:
        """Tracks that ended since the last call: (their capture or None, whether the count stands)."""
        out = []
        d = self.direction()
        for tr, _tid in self.finished:
            ok = tr.capture is not None and self._valid(tr, d)
            if tr.capture is not None:
                tr.capture.boxes = dict(tr.history)
                tr.capture.valid = ok
            if not ok:
                self.n_rejected += 1
            out.append((tr.capture, ok))
        self.finished = []
        return out

    def _valid(self, tr: _Track, d: np.ndarray | None) -> bool:
        if d is None or tr.capture.normal @ d <= 0:
            return False
        if tr.last_t - tr.first_t + 1 < self.min_pass_frames:
            return False
        proj = np.array(tr.positions) @ d
        return float(proj.max() - proj.min()) >= self.min_travel * self.lane.extent(d)
