"""Stage roi (MASKS -> ROI): narrow each image to its region of interest.

``roi.method``:
- ``none``: rows forwarded.
- ``mask``: make sure every image with a composite mask is masked by it.
- ``circle`` (round parts, seed 003 section 3.3): the largest circle
  (:func:`find_circle`, see ``circles.py``) -> square crop with the outside zeroed
  -> CLAHE on the L channel -> optional k=2 k-means++ segmentation of the circle
  (saved as roi_mask_path). No circle: roi_found False, image forwarded.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.circles import Circle, find_circle, to_grey
from defectflow.config import Params, RoiParams
from defectflow.fsutil import read_image, write_image
from defectflow.imgops import crop_square, safe_name
from defectflow.manifest import MASKS, ROI, read_manifest, write_manifest
from defectflow.masks import apply_mask
from defectflow.stage import skip_stage
from defectflow.stage import StageOutput, StageReport, logger, manifest_path, stage_run
from defectflow.units import Mapper, Unit, UnitResult, group_units, map_units, merge_rows
from defectflow.units.core import quarantine_meta, results

log = logger("roi")

KMEANS_SAMPLES = 20000   # pixels the k-means centres are fitted on (all pixels are then labelled)

__all__ = ["find_circle", "circle_roi", "kmeans_mask", "clahe", "run"]


def disc(size: int) -> np.ndarray:
    """Boolean disc filling a size x size square."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2.0
    return np.hypot(xx - c, yy - c) <= size / 2.0


def clahe(img: np.ndarray, clip: float) -> np.ndarray:
    """CLAHE on the L channel (colour) or on the image (grey)."""
    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8))
    if img.ndim == 2:
        return op.apply(img)
    lab = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = op.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def kmeans_mask(img: np.ndarray, inside: np.ndarray, seed: int) -> np.ndarray:
    """0/255 mask of the intensity cluster (k=2, k-means++) that holds the circle's centre."""
    values = to_grey(img)[inside].astype(np.float32).reshape(-1, 1)
    stride = max(1, len(values) // KMEANS_SAMPLES)
    cv2.setRNGSeed(int(seed))
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    _, _, centres = cv2.kmeans(values[::stride], 2, None, crit, 3, cv2.KMEANS_PP_CENTERS)
    labels = np.abs(values - centres.reshape(1, 2)).argmin(axis=1)
    full = np.full(inside.shape, -1, np.int64)
    full[inside] = labels
    n = inside.shape[0]
    core = np.zeros(inside.shape, np.uint8)
    cv2.circle(core, (n // 2, n // 2), max(1, n // 6), 1, -1)
    core = core.astype(bool) & inside
    fg = int(np.bincount(full[core], minlength=2).argmax()) if core.any() else 0
    return (full == fg).astype(np.uint8) * 255


def circle_roi(img: np.ndarray, circle: Circle, p: RoiParams, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Square crop around ``circle`` (outside zeroed, CLAHE), and its k-means mask if ``p.kmeans``."""
    cx, cy, r = circle
    size = min(img.shape[:2])
    side = max(1, int(round(2 * r)))
    crop = crop_square(img, (int(round(cx - r)), int(round(cy - r)), side), size)
    inside = disc(size)
    crop = clahe(crop, p.clahe_clip)
    crop[~inside] = 0
    return crop, (kmeans_mask(crop, inside, seed) if p.kmeans else None)


def _circle_rows(records: list[dict], params: Params, out: StageOutput) -> tuple[list[dict], list[str]]:
    """Circle ROI for every row; (new rows, the images without a circle)."""
    rows, missing = [], []
    for row in tqdm(records, desc="roi", unit="image", disable=None, leave=False):
        img = read_image(row["image_path"])
        circle = find_circle(img, params.roi.min_radius)
        if circle is None:
            missing.append(row["image_path"])
            log.debug("%s: no circle found, image forwarded as it is", row["image_path"])
            rows.append({**row, "roi_found": False, "roi_mask_path": None})
            continue
        crop, mask = circle_roi(img, circle, params.roi, params.seed)
        name = safe_name(row["item_id"])
        tmp, img_path = out.path(f"images/{name}.png")
        write_image(tmp, crop)
        mask_path = None
        if mask is not None:
            tmp, mask_path = out.path(f"masks/{name}.png")
            write_image(tmp, mask)
        rows.append({**row, "image_path": img_path, "roi_found": True, "roi_mask_path": mask_path})
    return rows, missing


def _mask_rows(records: list[dict], out: StageOutput) -> tuple[list[dict], int, int]:
    """Apply each row's composite mask where the image is not masked yet; (rows, re-masked, no composite)."""
    rows, remasked, missing = [], 0, 0
    for row in tqdm(records, desc="roi", unit="image", disable=None, leave=False):
        comp_path = row.get("composite_mask_path")
        if comp_path is None or pd.isna(comp_path):
            missing += 1
            rows.append(row)
            continue
        img = read_image(row["image_path"])
        masked = apply_mask(img, read_image(comp_path, cv2.IMREAD_GRAYSCALE))
        new = {**row, "roi_mask_path": comp_path}
        if not np.array_equal(masked, img):
            tmp, new["image_path"] = out.path(f"images/{safe_name(row['item_id'])}.png")
            write_image(tmp, masked)
            remasked += 1
        rows.append(new)
    return rows, remasked, missing


def _unit_inputs(rows: list[dict]) -> list[str]:
    return [r[c] for r in rows for c in ("image_path", "composite_mask_path") if isinstance(r.get(c), str)]


def units(params: Params, df: pd.DataFrame) -> list[Unit]:
    """Per video (run, camera) or image folder, cut into ``scale.unit_images`` rows."""
    return group_units("roi", df, _unit_inputs, chunk=params.scale.unit_images)


def run_unit(params: Params, unit: Unit, out: StageOutput) -> UnitResult:
    if params.roi.method == "circle":
        rows, missing = _circle_rows(unit.payload, params, out)
        return UnitResult(rows, {"missing": len(missing), "examples": missing[:3]})
    rows, remasked, missing = _mask_rows(unit.payload, out)
    return UnitResult(rows, {"remasked": remasked, "missing": missing})


def run(params: Params, inp: Path, out_dir: Path, mapper: Mapper | None = None) -> StageReport:
    """Region of interest of every image of ``inp`` as ``roi.method`` says (units: see ``units``)."""
    df = read_manifest(manifest_path(inp), MASKS)
    method = params.roi.method
    if method == "none":
        return skip_stage("roi", df, ROI, inp, out_dir, "roi.method=none: images used as they are")
    with stage_run("roi", out_dir) as (out, report):
        settings = {"roi": params.roi.model_dump(mode="json"), "seed": params.seed}
        outcomes = map_units("roi", params, units(params, df), run_unit, out, settings, report, mapper)
        rows = merge_rows(outcomes)
        stats = [r.stats for r in results(outcomes)]
        missing = sum(s["missing"] for s in stats)
        if method == "circle":
            if missing:
                log.warning("no circle found in %d image(s), forwarded as they are (e.g. %s)", missing,
                            ", ".join(e for s in stats for e in s["examples"][:3])[:400])
            report.notes.append(f"circle found in {len(rows) - missing}/{len(rows)} image(s); "
                                f"{missing} without a circle forwarded as they are")
        else:
            remasked = sum(s["remasked"] for s in stats)
            report.notes.append(f"{remasked} image(s) masked with their composite here, "
                                f"{len(rows) - missing - remasked} already masked")
            if missing:
                report.notes.append(f"{missing} image(s) have no composite mask: forwarded unmasked")
        out_df = pd.DataFrame(rows, columns=ROI.names)
        write_manifest(out_df, ROI, out.manifest, meta={"method": method, **quarantine_meta(outcomes)})
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
    return report
