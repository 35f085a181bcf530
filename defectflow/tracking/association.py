"""Frame-to-frame association of product boxes: two interchangeable backends.

Both take a lane's candidate boxes (frame px) once per tracked frame and return the confirmed
tracks as ``(track_id, box, measured)`` (``measured``: matched to a blob now, else predicted).

- :class:`BeltAssociation` (``frames.tracker: belt``, default): boxes predicted at constant
  velocity (each new track starts at the belt's current velocity: every product on a belt moves
  with it), matched on IoU by an optimal assignment (``scipy.optimize.linear_sum_assignment``),
  confirmed tracks first, new ones after; a track is confirmed after ``INIT_UPDATES`` more
  matches and ends after ``lost_updates`` updates without one. About 40 us an update.
- :class:`NorfairAssociation` (``frames.tracker: norfair``): norfair's tracker (the
  ``norfair-enough`` distribution, a maintained fork of tryolabs/norfair) on box IoU with its
  Kalman filter per box corner. The library this project would rather lean on: measured at
  220-570 us an update with three products in view (its per-object Python work), about one to
  two full decodes of a 320 x 240 frame, it puts the frames stage at 2.3x a bare decode of the
  stream demo at ``stride`` 3 (the must is 1.5x), so it is the choice for high-resolution
  footage, where decoding dominates. Why norfair and not the others: it is the tracking library
  that installs cleanly beside ``opencv-python-headless`` and numpy 2 (upstream norfair 2.3.0
  pins numpy < 2 and rich < 15; ``trackers``, which now holds supervision's ByteTrack, and
  supervision <= 0.31.0 require ``opencv-python``, a second cv2 that overwrites the headless
  one; supervision 0.31.2 no longer ships a tracker).
"""
from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

MIN_IOU = 0.1                # a predicted box and a blob overlapping less than this never match
INIT_UPDATES = 1             # a track is reported after this many more matched updates
VELOCITY_GAIN = 0.5          # share of a track's new displacement taken into its velocity
BELT_GAIN = 0.3              # the lane's belt velocity follows its matched tracks this fast

Box = tuple[float, float, float, float]
Tracked = tuple[int, Box, bool]


def iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes (plain floats: a few products, no arrays)."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class _BeltTrack:
    __slots__ = ("id", "box", "vel", "hits", "misses")

    def __init__(self, box: list[float], vel: list[float]):
        self.id, self.box, self.vel, self.hits, self.misses = 0, box, vel, 1, 0

    def predicted(self) -> list[float]:
        return [b + v for b, v in zip(self.box, self.vel)]


class BeltAssociation:
    """Constant-velocity boxes matched on IoU by optimal assignment (see the module docstring).

    Plain Python floats: with a handful of products in view, numpy's per-call cost would be most of it.
    """

    def __init__(self, lost_updates: int):
        self.lost_updates = lost_updates
        self.next_id = 1
        self.tracks: list[_BeltTrack] = []
        self.belt = [0.0, 0.0, 0.0, 0.0]

    @staticmethod
    def _match(tracks: list[_BeltTrack], preds: list[list[float]], dets: list, free: list[int]) -> list[tuple]:
        """(track, prediction, detection index) pairs: the assignment maximising the summed IoU."""
        if not tracks or not free:
            return []
        cost = np.array([[iou(p, dets[j]) for j in free] for p in preds])
        rows, cols = linear_sum_assignment(cost, maximize=True)
        return [(tracks[r], preds[r], free[c]) for r, c in zip(rows, cols) if cost[r, c] >= MIN_IOU]

    def update(self, boxes: list[Box]) -> list[Tracked]:
        dets = [list(b) for b in boxes]
        free = list(range(len(dets)))
        measured: set[int] = set()
        moves = []
        for group in ([tr for tr in self.tracks if tr.id], [tr for tr in self.tracks if not tr.id]):
            preds = [tr.predicted() for tr in group]
            pairs = self._match(group, preds, dets, free)
            taken = {j for _, _, j in pairs}
            free = [j for j in free if j not in taken]
            for tr, _, j in pairs:
                step = [d - b for d, b in zip(dets[j], tr.box)]
                tr.vel = [v + VELOCITY_GAIN * (st - v) for v, st in zip(tr.vel, step)]
                moves.append(step)
                tr.box, tr.misses, tr.hits = dets[j], 0, tr.hits + 1
                if not tr.id and tr.hits > INIT_UPDATES:
                    tr.id, self.next_id = self.next_id, self.next_id + 1
                measured.add(id(tr))
        if moves:
            mean = [sum(m[k] for m in moves) / len(moves) for k in range(4)]
            self.belt = [b + BELT_GAIN * (m - b) for b, m in zip(self.belt, mean)]
        alive = []
        for tr in self.tracks:
            if id(tr) not in measured:
                tr.box, tr.misses = tr.predicted(), tr.misses + 1
                if not tr.id or tr.misses > self.lost_updates:
                    continue
            alive.append(tr)
        self.tracks = alive + [_BeltTrack(dets[j], list(self.belt)) for j in free]
        return [(tr.id, tuple(tr.box), id(tr) in measured) for tr in self.tracks if tr.id]


# box-corner Kalman filters: a belt changes speed within a few updates (stop-and-go), so the velocity
# must be learnt fast (norfair's defaults, Q 0.1 / velocity variance 1, lag a stride-3 belt into id switches)
KALMAN = {"R": 4.0, "Q": 5.0, "pos_variance": 10.0, "vel_variance": 100.0}


class NorfairAssociation:
    """norfair's tracker on box IoU with a Kalman filter per box corner (see the module docstring)."""

    def __init__(self, lost_updates: int):
        from norfair import Tracker
        from norfair.filter import OptimizedKalmanFilterFactory

        # norfair warns on every IoU with a predicted box whose corners crossed (a track shrinking out of view)
        logging.getLogger("norfair.distances").setLevel(logging.ERROR)
        self.tracker = Tracker(distance_function="iou", distance_threshold=1.0 - MIN_IOU,
                               hit_counter_max=lost_updates, initialization_delay=INIT_UPDATES,
                               past_detections_length=0, filter_factory=OptimizedKalmanFilterFactory(**KALMAN))
        self.t = 0

    def update(self, boxes: list[Box]) -> list[Tracked]:
        from norfair import Detection

        self.t += 1
        dets = [Detection(np.array([[b[0], b[1]], [b[2], b[3]]], np.float64), data=(self.t, b)) for b in boxes]
        out = []
        for obj in self.tracker.update(dets or None, period=1):
            det_t, det_box = obj.last_detection.data
            if det_t == self.t:
                out.append((int(obj.id), tuple(float(v) for v in det_box), True))
                continue
            est = obj.estimate
            xa, xb = sorted((float(est[0, 0]), float(est[1, 0])))
            ya, yb = sorted((float(est[0, 1]), float(est[1, 1])))
            out.append((int(obj.id), (xa, ya, xb, yb), False))
        return out


BACKENDS = {"belt": BeltAssociation, "norfair": NorfairAssociation}
