"""The demo's products and how a camera sees them: bottles and jars with a printed label, and defects.

A product is a shaded body + shoulder + neck silhouette; the label is printed on part of the
circumference and the product sits on the belt at a random turn, so every camera sees a different
side. A defect (scratch, dent, stain, crack) sits at an angle on the circumference; only cameras
within ``VISIBLE_DEG`` of that angle see it. Used by ``demo.py`` (cameras) and ``demo_streams.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CAMERAS = ("cam0", "cam1", "cam2", "cam3")
CAMERA_DEG = {cam: 90.0 * i for i, cam in enumerate(CAMERAS)}
VISIBLE_DEG = 60.0      # a camera sees a defect within this angle of its line of sight

# Half-width profiles at scale 1: (row, half width) knots from the top; parts by row range.
_PROFILES = {
    "bottle": {"knots": ((0, 13), (10, 13), (10.01, 10), (32, 10), (54, 30), (127, 30), (132, 26)),
               "cap_end": 10, "body": (54, 128), "height": 132},
    "jar": {"knots": ((0, 31), (14, 31), (14.01, 28), (22, 28), (30, 36), (105, 36), (110, 32)),
            "cap_end": 14, "body": (30, 106), "height": 110},
}
_BODY_BGR = {"bottle": (222, 228, 232), "jar": (205, 222, 236)}
_CAP_BGR = {"bottle": (60, 60, 170), "jar": (170, 170, 175)}
_BRAND_BGR = {"bottle": (50, 70, 185), "jar": (150, 90, 40)}
_LABEL_BGR = (215, 238, 245)
_STAIN_BGR = np.array((45, 80, 125), np.float32)


@dataclass(frozen=True)
class Product:
    """One physical product of a run (one pass per camera)."""

    product_id: str
    run: str
    pass_index: int
    split: str
    kind: str
    scale: float
    tint: tuple[float, float, float]
    y_base: int
    turn: float                       # radians: product orientation on the belt
    defect_type: str | None = None
    defect_angle: float = 0.0         # radians on the product's circumference
    defect_height: float = 0.5        # fraction of the body height
    defect_seed: int = 0

    @property
    def label(self) -> str:
        return "good" if self.defect_type is None else "defect"

    def sees_defect(self, camera: str) -> bool:
        return self.defect_type is not None and abs(self.view_offset(camera)) <= math.radians(VISIBLE_DEG)

    def view_offset(self, camera: str) -> float:
        """Angle of the defect from the camera's line of sight, in (-pi, pi]."""
        d = self.defect_angle - self.turn - math.radians(CAMERA_DEG[camera])
        return math.atan2(math.sin(d), math.cos(d))

    def defect_cameras(self) -> list[str]:
        return [c for c in CAMERAS if self.sees_defect(c)]


def _sprite_width(p: Product) -> int:
    return int(math.ceil(2 * max(hw for _, hw in _PROFILES[p.kind]["knots"]) * p.scale)) + 4


def _profile(p: Product) -> tuple[np.ndarray, int]:
    """Half-width per sprite row, and the sprite height."""
    prof = _PROFILES[p.kind]
    height = int(math.ceil(prof["height"] * p.scale))
    rows = (np.arange(height, dtype=np.float32) + 0.5) / p.scale
    ky, khw = zip(*prof["knots"])
    return np.interp(rows, ky, khw).astype(np.float32) * p.scale, height


def _label_pattern(p: Product, phi: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label colour weights: (on-label mask, brand-print mask) over the sprite, from the
    circumference angle ``phi`` (degrees) and the body-relative row ``rows`` (0 top, 1 bottom)."""
    on_rows = (rows > 0.18) & (rows < 0.82)
    on = on_rows & (phi < 250.0)
    ly = (rows - 0.18) / 0.64
    bands = (ly < 0.12) | (ly > 0.88)
    logo = ((phi - 125.0) / 38.0) ** 2 + ((ly - 0.4) / 0.16) ** 2 < 1.0
    text = (np.abs(ly - 0.66) < 0.03) | (np.abs(ly - 0.75) < 0.03)
    text &= (phi > 60) & (phi < 190) & (np.sin(np.radians(phi) * 45) > -0.3)
    return on.astype(np.float32), (on & (bands | logo | text)).astype(np.float32)


def render_sprite(p: Product, camera: str, light: float) -> tuple[np.ndarray, np.ndarray]:
    """The product as seen from ``camera``: (BGR float32 HxWx3, alpha float32 HxW)."""
    prof = _PROFILES[p.kind]
    hw, height = _profile(p)
    width = _sprite_width(p)
    x = np.arange(width, dtype=np.float32) + 0.5 - width / 2
    alpha = np.clip(hw[:, None] - np.abs(x)[None, :] + 0.5, 0, 1)
    u = np.clip(x[None, :] / np.maximum(hw[:, None], 1e-3), -1, 1)
    normal = np.arcsin(u)                                         # surface normal vs line of sight
    phi = np.degrees(normal + p.turn + math.radians(CAMERA_DEG[camera])) % 360.0
    row = np.arange(height, dtype=np.float32)[:, None] / p.scale
    b0, b1 = prof["body"]
    body_rows = (row - b0) / (b1 - b0)

    tint = np.array(p.tint, np.float32)
    rgb = np.broadcast_to(np.array(_BODY_BGR[p.kind], np.float32) * tint, (height, width, 3)).copy()
    on_label, brand = _label_pattern(p, phi, np.broadcast_to(body_rows, phi.shape))
    rgb = rgb * (1 - on_label[..., None]) + np.array(_LABEL_BGR, np.float32) * on_label[..., None]
    rgb = rgb * (1 - brand[..., None]) + np.array(_BRAND_BGR[p.kind], np.float32) * brand[..., None]
    cap = np.broadcast_to(row < prof["cap_end"], phi.shape)
    rgb[cap] = np.array(_CAP_BGR[p.kind], np.float32) * tint

    diffuse = 0.35 + 0.65 * np.clip(np.cos(normal - light), 0, 1)
    shoulder = np.broadcast_to((row >= prof["cap_end"]) & (row < b0), phi.shape)
    diffuse = np.where(shoulder, diffuse * 0.85, diffuse)
    spec = 55.0 * np.exp(-((normal - light / 2) / 0.12) ** 2)
    rgb = rgb * diffuse[..., None] + spec[..., None]
    if p.sees_defect(camera):
        body = alpha * np.broadcast_to((row >= b0 + 3) & (row < b1 - 3), phi.shape)
        rgb = _draw_defect(rgb, body, p, camera, hw, diffuse)
    return np.clip(rgb, 0, 255), alpha


def _defect_anchor(p: Product, camera: str, hw: np.ndarray, width: int) -> tuple[float, float, float]:
    """Sprite (x, y) of the defect centre and its horizontal foreshortening for ``camera``."""
    b0, b1 = _PROFILES[p.kind]["body"]
    y = (b0 + p.defect_height * (b1 - b0)) * p.scale
    off = p.view_offset(camera)
    x = width / 2 + math.sin(off) * float(hw[min(int(y), len(hw) - 1)])
    return x, y, math.cos(off)


def _to_sprite(pts: np.ndarray, anchor: tuple[float, float, float]) -> np.ndarray:
    """Surface-local points (dx, dy) to sprite pixel coordinates, fixed-point for cv2 (shift 4)."""
    x, y, fx = anchor
    out = np.stack([x + pts[:, 0] * fx, y + pts[:, 1]], axis=1)
    return np.round(out * 16).astype(np.int32)


def _polyline(rng: np.random.Generator, n: int, step: float, jitter: float, start=(0.0, 0.0), angle=None):
    ang = rng.uniform(0, 2 * math.pi) if angle is None else angle
    pts = [np.array(start, np.float64)]
    for _ in range(n):
        ang += rng.uniform(-jitter, jitter)
        pts.append(pts[-1] + step * rng.uniform(0.7, 1.3) * np.array([math.cos(ang), math.sin(ang)]))
    return np.array(pts)


def _draw_defect(rgb, body, p: Product, camera: str, hw, diffuse) -> np.ndarray:
    """Paint ``p``'s defect as seen from ``camera`` (same shape from every camera)."""
    rng = np.random.default_rng(p.defect_seed)
    h, w = body.shape
    anchor = _defect_anchor(p, camera, hw, w)
    s = p.scale
    mask = np.zeros((h, w), np.uint8)
    kind = p.defect_type
    if kind == "scratch":
        ang = rng.uniform(0, math.pi)
        d = np.array([math.cos(ang), math.sin(ang)])
        n = np.array([-d[1], d[0]])
        for i in range(int(rng.integers(2, 4))):
            half = rng.uniform(11, 17) * s
            c = n * (i - 1) * rng.uniform(3, 5) * s + d * rng.uniform(-3, 3)
            seg = _to_sprite(np.array([c - d * half, c + d * half]), anchor)
            cv2.line(mask, tuple(seg[0]), tuple(seg[1]), 255, 2 if i == 0 else 1, cv2.LINE_AA, 4)
        m = mask.astype(np.float32) / 255 * body
        return rgb * (1 - 0.7 * m[..., None])
    if kind == "crack":
        main = _polyline(rng, int(rng.integers(7, 10)), 5.0 * s, 0.9)
        main -= main.mean(axis=0)
        branch = _polyline(rng, 3, 4.0 * s, 0.9, start=main[len(main) // 2])
        for line, th in ((main, 2), (branch, 1)):
            cv2.polylines(mask, [_to_sprite(line, anchor)], False, 255, th, cv2.LINE_AA, 4)
        m = mask.astype(np.float32) / 255 * body
        return rgb * (1 - 0.85 * m[..., None])
    if kind == "stain":
        for _ in range(int(rng.integers(4, 7))):
            c = rng.normal(0, 4.0 * s, 2)
            r = rng.uniform(4, 7.5) * s
            circle = cv2.ellipse2Poly((0, 0), (100, 100), 0, 0, 360, 20).astype(np.float64) / 100 * r + c
            cv2.fillPoly(mask, [_to_sprite(circle, anchor)], 255, cv2.LINE_AA, 4)
        m = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 1.5) * body * 0.8
        stain = _STAIN_BGR[None, None, :] * diffuse[..., None]
        return rgb * (1 - m[..., None]) + stain * m[..., None]
    if kind == "dent":
        rx, ry = rng.uniform(9, 12) * s, rng.uniform(6, 9) * s
        ell = cv2.ellipse2Poly((0, 0), (100, 100), 0, 0, 360, 10).astype(np.float64) / 100 * [rx, ry]
        cv2.fillPoly(mask, [_to_sprite(ell, anchor)], 255, cv2.LINE_AA, 4)
        m = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 1.5) * body
        x, y, fx = anchor
        gx = np.clip((np.arange(w, dtype=np.float32) - x) / max(rx * fx, 1.0), -1, 1)[None, :]
        mult = 1 - m * (0.3 + 0.45 * gx)                    # dark on the far side, lit rim near
        return rgb * mult[..., None]
    raise ValueError(f"unknown defect type {kind!r}")
