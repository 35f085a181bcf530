"""Lanes: where products pass (a rectangle or polygon), which way, and where they are counted.

All geometry is in frame pixels; :class:`Grid` maps it onto the downscaled grey image that
motion is measured on (at most ``WORK_WIDTH`` pixels wide over the lanes' bounding box).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from defectflow.config import FramesParams, LaneParams
from defectflow.sources.videos import DEFAULT_LANE

WORK_WIDTH = 160             # motion is measured on the lanes' area downscaled to at most this width
DIRECTION_VECTORS = {"left_to_right": (1.0, 0.0), "right_to_left": (-1.0, 0.0),
                     "top_to_bottom": (0.0, 1.0), "bottom_to_top": (0.0, -1.0)}


def region_polygon(region, width: int, height: int) -> np.ndarray:
    """(N, 2) float polygon in frame pixels of a rectangle ``[x0, y0, x1, y1]`` / polygon region (None: the frame)."""
    if region is None:
        region = (0.0, 0.0, 1.0, 1.0)
    if len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
        x0, y0, x1, y1 = region
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    else:
        pts = [tuple(p) for p in region]
    return np.array([(x * width, y * height) for x, y in pts], np.float64)


@dataclass
class Lane:
    """One belt in a camera's view, in frame pixels."""

    name: str
    polygon: np.ndarray                       # (N, 2) frame px
    direction: np.ndarray | None              # unit vector of travel; None: estimated from the tracks
    line: tuple[np.ndarray, np.ndarray] | None = None   # two points of the counting line; None: through centre
    product_length: float | None = None       # fraction of the lane's extent along the travel

    def __post_init__(self):
        m = cv2.moments(self.polygon.astype(np.float32))
        self.centre = (self.polygon.mean(axis=0) if m["m00"] <= 0
                       else np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]]))   # the polygon's centroid

    def extent(self, d: np.ndarray) -> float:
        """Length of the lane along direction ``d`` (frame px)."""
        proj = self.polygon @ d
        return float(proj.max() - proj.min())

    def line_normal(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(point on the counting line, unit normal pointing along ``d``): s = (p - point) . normal."""
        if self.line is None:
            return self.centre, d
        a, b = self.line
        t = (b - a) / max(np.linalg.norm(b - a), 1e-9)
        n = np.array([-t[1], t[0]])
        return a, (n if n @ d >= 0 else -n)


def _lane(name: str, region, direction: str, line, product_length, w: int, h: int) -> Lane:
    vec = DIRECTION_VECTORS.get(direction)
    pts = None if line is None else (np.array(line[:2], float) * (w, h), np.array(line[2:], float) * (w, h))
    return Lane(name, region_polygon(region, w, h), None if vec is None else np.array(vec), pts, product_length)


def lanes_for_camera(fp: FramesParams, camera: str, width: int, height: int) -> list[Lane]:
    """The lanes ``camera`` sees: the frames.lanes listing it (or listing no cameras), else frames.region."""
    chosen: list[LaneParams] = [ln for ln in fp.lanes or [] if ln.cameras is None or camera in ln.cameras]
    if not chosen:
        return [_lane(DEFAULT_LANE, fp.region, fp.direction, None, fp.product_length, width, height)]
    return [_lane(ln.name, ln.region, ln.direction or fp.direction, ln.line,
                  ln.product_length or fp.product_length, width, height) for ln in chosen]


class Grid:
    """The downscaled motion image: the lanes' bounding box, at most WORK_WIDTH wide.

    ``reduce``: frames handed in are already downscaled by this factor (reduced JPEG decode).
    """

    def __init__(self, lanes: list[Lane], frame_shape: tuple[int, ...], reduce: int = 1):
        h, w = frame_shape[:2]
        allpts = np.vstack([ln.polygon for ln in lanes])
        self.x0 = int(np.clip(math.floor(allpts[:, 0].min()), 0, w - 1))
        self.y0 = int(np.clip(math.floor(allpts[:, 1].min()), 0, h - 1))
        self.x1 = int(np.clip(math.ceil(allpts[:, 0].max()), self.x0 + 1, w))
        self.y1 = int(np.clip(math.ceil(allpts[:, 1].max()), self.y0 + 1, h))
        self.reduce = reduce
        self.rx0, self.ry0 = self.x0 // reduce, self.y0 // reduce
        self.rx1 = max(-(-self.x1 // reduce), self.rx0 + 1)
        self.ry1 = max(-(-self.y1 // reduce), self.ry0 + 1)
        width = self.x1 - self.x0
        scale = min(1.0, WORK_WIDTH / width)
        self.size = (max(1, round(width * scale)), max(1, round((self.y1 - self.y0) * scale)))
        self.scale = self.size[0] / width                     # grid pixels per frame pixel
        self.masks = [self._mask(ln.polygon) for ln in lanes]

    def _mask(self, polygon: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.size[::-1], np.uint8)
        pts = np.round((polygon - (self.x0, self.y0)) * self.scale * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, 4)
        return mask

    def small(self, frame: np.ndarray) -> np.ndarray:
        """Grey, downscaled float32 copy of the lanes' area (area averaging also tames noise)."""
        roi = frame[self.ry0:self.ry1, self.rx0:self.rx1]
        if roi.ndim == 3:                      # grey first: the resize then moves a third of the bytes
            roi = cv2.cvtColor(roi, cv2.COLOR_BGR2GRAY)
        if roi.shape[1] != self.size[0] or roi.shape[0] != self.size[1]:
            roi = cv2.resize(roi, self.size, interpolation=cv2.INTER_AREA)
        return roi.astype(np.float32)

    def to_frame(self, box) -> tuple[float, float, float, float]:
        """Grid box (x0, y0, x1, y1; x1/y1 exclusive) -> frame pixels."""
        x0, y0, x1, y1 = box
        s = self.scale
        return (self.x0 + x0 / s, self.y0 + y0 / s, self.x0 + x1 / s, self.y0 + y1 / s)

    def to_grid(self, box) -> tuple[int, int, int, int]:
        """Frame box -> grid box (rounded outwards, clipped to the grid)."""
        x0, y0, x1, y1 = box
        s, (gw, gh) = self.scale, self.size
        clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
        return (clip(math.floor((x0 - self.x0) * s), gw), clip(math.floor((y0 - self.y0) * s), gh),
                clip(math.ceil((x1 - self.x0) * s), gw), clip(math.ceil((y1 - self.y0) * s), gh))
