"""Figures of the masks stage against the demo generator's truth (used by bench/vision.py).

``measure_masks(demo_dir, detect_dir, masks_dir)`` compares every product/camera composite
mask with the true silhouette (``truth/silhouettes/<run>_<camera>_<pass:03d>.png``, taken at the
pass's centre frame) mapped through the detect stage's square crop. Two composites are compared:

- ``mask_iou``: the composite BEFORE the shrink (``masks.shrink`` = 0; the ``composite_raw``
  files the stage keeps) against the silhouette in the centre frame's crop — the figure with the
  >= 0.9 target, since a 10% shrink alone caps the IoU at about 0.81 by construction;
- ``mask_iou_shrunk``: the final (shrunk + padded) composite, the mask actually applied.

``background_leak``: over every crop the final composite is applied to (each window frame), the
share of the pixels kept by the mask that are background (not the product). The silhouette of a
non-centre frame is the centre one moved by the true box's offset (products only translate).
``background_leak_of_bg``: the same background pixels over all background pixels of the crop.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.imgops import crop_square, square_box


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(mask, m, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_NEAREST, borderValue=0)


def truth_in_crop(sil: np.ndarray, row, margin: float, size: int) -> np.ndarray:
    """Boolean silhouette of ``sil`` (frame-sized) in the crop ``row``'s box gave."""
    box = (int(row.box_x0), int(row.box_y0), int(row.box_x1), int(row.box_y1))
    return crop_square(sil, square_box(box, margin), size) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def measure_masks(demo_dir: Path, detect_dir: Path, masks_dir: Path, margin: float = 0.1) -> dict:
    demo_dir, masks_dir = Path(demo_dir), Path(masks_dir)
    df = pd.read_parquet(masks_dir / "manifest.parquet")
    df = df[df.composite_mask_path.notna()]
    boxes = pd.read_csv(demo_dir / "truth" / "boxes.csv")
    centres = boxes[boxes.is_center].set_index(["run", "camera", "pass_index"])
    boxes = boxes.set_index(["run", "camera", "pass_index", "frame_index"])
    ious, ious_shrunk, kept, kept_bg, bg_all = [], [], 0, 0, 0
    for (run, cam, pidx), g in df.groupby(["run", "camera", "pass_index"]):
        sil = cv2.imread(str(demo_dir / "truth" / "silhouettes" / f"{run}_{cam}_{int(pidx):03d}.png"),
                         cv2.IMREAD_GRAYSCALE)
        if sil is None or (run, cam, int(pidx)) not in centres.index:
            continue
        tc = centres.loc[(run, cam, int(pidx))]                # the frame the silhouette was drawn at
        comp_path = g.composite_mask_path.iloc[0]
        comp = cv2.imread(comp_path, cv2.IMREAD_GRAYSCALE) > 0
        raw_path = Path(comp_path.replace("/composite/", "/composite_raw/"))
        raw = cv2.imread(str(raw_path), cv2.IMREAD_GRAYSCALE) > 0 if raw_path.is_file() else None
        size = comp.shape[0]
        g_iou, g_iou_s = [], []
        for row in g.itertuples():
            key = (run, cam, int(pidx), int(row.frame_index))
            if key not in boxes.index:
                continue
            t = boxes.loc[key]
            if (t.x1 - t.x0) != (tc.x1 - tc.x0) or (t.y1 - t.y0) != (tc.y1 - tc.y0):
                continue                                         # clipped at the frame edge: shift unknown
            truth = truth_in_crop(_shift(sil, int(t.x0 - tc.x0), int(t.y0 - tc.y0)), row, margin, size)
            g_iou_s.append(_iou(comp, truth))
            if raw is not None:
                g_iou.append(_iou(raw, truth))
            kept += int(comp.sum())
            kept_bg += int((comp & ~truth).sum())
            bg_all += int((~truth).sum())
        if g_iou_s:
            ious_shrunk.append(np.mean(g_iou_s))
        if g_iou:
            ious.append(np.mean(g_iou))
    r4 = lambda v: round(float(v), 4)  # noqa: E731
    return {
        "mask_iou": r4(np.mean(ious)) if ious else None,
        "mask_iou_median": r4(np.median(ious)) if ious else None,
        "mask_iou_min": r4(np.min(ious)) if ious else None,
        "mask_iou_shrunk": r4(np.mean(ious_shrunk)) if ious_shrunk else None,
        "background_leak": round(kept_bg / kept, 5) if kept else None,
        "background_leak_of_bg": round(kept_bg / bg_all, 5) if bg_all else None,
        "mask_groups": len(ious_shrunk),
    }
