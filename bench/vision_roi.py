"""Figures of the circle ROI (seed 003, section 3.3) — used by bench/vision.py.

``measure_synthetic_circles``: generated round parts (a bright metal ring around a dark
absorber coating, as in seed 003) with a known centre and radius, at random places and sizes,
with sensor noise, an illumination gradient, a specular glint, scratches on the coating and,
for some, a cable/clamp occluding part of the rim or a line across the image. The figure is
the centre error over the true radius (mean, 95th percentile, max) and the share found.

``measure_bottle``: ``roi.circle`` on every image of an MVTec-AD category folder (the bottle:
a top view of a round bottle opening), loaded with the ``images`` source; the share of images
with a circle, the spread of the radius (the rim of the bottle is the same size in every image,
so a wrong circle shows up as an outlier) and a contact sheet of 16 results (image with the
circle drawn, the ROI, the k-means mask).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from defectflow.circles import find_circle
from defectflow.config import RoiParams, params_from_dict
from defectflow.fsutil import read_image
from defectflow.roi import circle_roi
from defectflow.sources.images import load_items


def circular_part(rng: np.random.Generator, size: tuple[int, int] = (240, 320)):
    """A generated round part; returns (BGR image, (cx, cy, r)) with the true outer rim."""
    h, w = size
    side = min(h, w)
    r = float(rng.uniform(0.22, 0.45) * side)
    cx = float(rng.uniform(r + 4, w - r - 4))
    cy = float(rng.uniform(r + 4, h - r - 4))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    bg = rng.uniform(40, 120)
    img = np.full((h, w), bg, np.float32)
    img += rng.uniform(-25, 25) * (xx / w - 0.5) + rng.uniform(-25, 25) * (yy / h - 0.5)   # light gradient
    d = np.hypot(xx - cx, yy - cy)
    ring = rng.uniform(150, 220)
    coat = rng.uniform(15, 60)
    inner = r * rng.uniform(0.55, 0.8)
    aa = lambda edge: np.clip(edge - d + 0.5, 0, 1)  # noqa: E731  (anti-aliased disc of radius `edge`)
    img = img * (1 - aa(r)) + ring * aa(r)
    img = img * (1 - aa(inner)) + coat * aa(inner)
    glint = (rng.uniform(-0.5, 0.5) * r, rng.uniform(-0.5, 0.5) * r)
    img += 60 * np.exp(-((xx - cx - glint[0]) ** 2 + (yy - cy - glint[1]) ** 2) / (2 * (0.08 * r) ** 2))
    out = np.repeat(img[:, :, None], 3, axis=2)
    out *= rng.uniform(0.9, 1.1, 3)[None, None, :]                # a colour cast
    for _ in range(int(rng.integers(0, 3))):                       # scratches on the coating
        a, ln = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5) * inner
        p0 = (cx + rng.uniform(-0.4, 0.4) * inner, cy + rng.uniform(-0.4, 0.4) * inner)
        p1 = (p0[0] + ln * np.cos(a), p0[1] + ln * np.sin(a))
        cv2.line(out, tuple(int(v) for v in p0), tuple(int(v) for v in p1), (110, 110, 110), 1)
    kind = rng.choice(["plain", "plain", "occluded", "crossed"])
    if kind == "occluded":                                         # a clamp over part of the rim
        a = rng.uniform(0, 2 * np.pi)
        px, py = cx + r * np.cos(a), cy + r * np.sin(a)
        cv2.circle(out, (int(px), int(py)), int(0.3 * r), (bg * 0.6,) * 3, -1)
    elif kind == "crossed":                                        # a cable across the image
        cv2.line(out, (0, int(rng.uniform(0, h))), (w, int(rng.uniform(0, h))), (235, 235, 235), 2)
    out += rng.normal(0, rng.uniform(2, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8), (cx, cy, r)


def measure_synthetic_circles(n: int = 60, seed: int = 0, min_radius: float = 0.15) -> dict:
    rng = np.random.default_rng(seed)
    errs, found = [], 0
    for _ in range(n):
        img, (cx, cy, r) = circular_part(rng)
        c = find_circle(img, min_radius)
        if c is None:
            continue
        found += 1
        errs.append(float(np.hypot(c[0] - cx, c[1] - cy) / r))
    errs_a = np.array(errs) if errs else np.array([np.nan])
    return {
        "circle_center_err_rel": round(float(errs_a.max()), 4),
        "circle_center_err_rel_mean": round(float(errs_a.mean()), 4),
        "circle_center_err_rel_p95": round(float(np.percentile(errs_a, 95)), 4),
        "circle_synthetic_found_rate": round(found / n, 4),
        "circle_synthetic_n": n,
    }


def _tile(img: np.ndarray, side: int) -> np.ndarray:
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)


def measure_bottle(data_dir: Path, sheet_path: Path | None = None, n_sheet: int = 16,
                   roi_params: RoiParams | None = None, seed: int = 0) -> dict:
    """Circle ROI on every image of an MVTec category folder; a contact sheet of ``n_sheet`` results."""
    params = params_from_dict({"source": {"kind": "images", "path": str(data_dir)}, "seed": seed})
    p = roi_params or RoiParams(method="circle")
    items = load_items(params)
    radii, centres, found, sheet_rows = [], [], 0, []
    pick = set(np.linspace(0, len(items) - 1, n_sheet).round().astype(int).tolist())
    for i, row in enumerate(items.itertuples()):
        img = read_image(row.image_path)
        c = find_circle(img, p.min_radius)
        if c is not None:
            found += 1
            radii.append(c[2] / min(img.shape[:2]))
            centres.append((c[0] / img.shape[1], c[1] / img.shape[0]))
        if sheet_path is not None and i in pick:
            side = 220
            shown = img.copy()
            tiles = [_tile(shown, side)]
            if c is not None:
                cv2.circle(shown, (int(round(c[0])), int(round(c[1]))), int(round(c[2])), (0, 255, 0), 4)
                cv2.drawMarker(shown, (int(round(c[0])), int(round(c[1]))), (0, 255, 0), cv2.MARKER_CROSS, 40, 4)
                crop, mask = circle_roi(img, c, p, seed)
                tiles = [_tile(shown, side), _tile(crop, side),
                         _tile(mask if mask is not None else np.zeros(crop.shape[:2], np.uint8), side)]
            else:
                tiles += [np.zeros((side, side, 3), np.uint8)] * 2
            label = f"{row.split}/{row.defect_type if isinstance(row.defect_type, str) else 'good'} {Path(row.image_path).name}"
            cv2.putText(tiles[0], label, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
            sheet_rows.append(np.hstack(tiles))
    if sheet_path is not None and sheet_rows:
        rows = [np.hstack(sheet_rows[i:i + 2]) if i + 1 < len(sheet_rows) else
                np.hstack([sheet_rows[i], np.zeros_like(sheet_rows[i])]) for i in range(0, len(sheet_rows), 2)]
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sheet_path), np.vstack(rows))
    r = np.array(radii) if radii else np.array([np.nan])
    cen = np.array(centres) if centres else np.full((1, 2), np.nan)
    return {
        "bottle_circle_found_rate": round(found / max(1, len(items)), 4),
        "bottle_images": len(items),
        "bottle_radius_rel_median": round(float(np.median(r)), 4),
        "bottle_radius_rel_iqr": round(float(np.subtract(*np.percentile(r, [75, 25]))), 4),
        "bottle_radius_outliers": int((np.abs(r - np.median(r)) > 0.05).sum()),
        "bottle_centre_rel_spread": round(float(np.linalg.norm(cen - np.median(cen, axis=0), axis=1).max()), 4),
        "bottle_sheet": str(sheet_path) if sheet_path is not None else None,
    }
