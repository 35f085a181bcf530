"""Stage masks (DETECT -> MASKS): remove the background around each product crop.

Per crop a soft foreground mask from the difference to the background plate
(cropped and resized exactly like the crop). Per product + camera the soft masks
of its window crops are averaged into a composite, thresholded at
``masks.threshold``, reduced to its largest component with holes filled, then
shrunk by ``masks.shrink`` about the centre and padded back (seed 000, III.B,
Fig. 4d). The composite is applied to every crop of that product/camera.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.fsutil import read_image, write_image
from defectflow.imgops import colour_diff, crop_square, largest_filled, safe_name, shrink_and_pad, square_box
from defectflow.manifest import DETECT, MASKS, read_manifest, write_manifest
from defectflow.stage import skip_stage
from defectflow.stage import StageOutput, StageReport, logger, manifest_path, stage_run

log = logger("masks")

BOX_COLS = ["box_x0", "box_y0", "box_x1", "box_y1"]


class MasksError(DefectflowError):
    """A crop does not match what the detect stage writes."""


def soft_foreground(crop: np.ndarray, plate_crop: np.ndarray, diff_threshold: int) -> np.ndarray:
    """Foreground likelihood in [0, 1] (float32): blurred plate difference, ramped around the threshold.

    A difference of ``diff_threshold`` maps to 0.5; half of it to 0, 1.5 times it to 1.
    """
    if crop.shape != plate_crop.shape:
        raise ValueError(f"crop {crop.shape} and background crop {plate_crop.shape} differ in size")
    diff = colour_diff(crop, plate_crop).astype(np.float32)
    diff = cv2.GaussianBlur(diff, (0, 0), sigmaX=max(1.0, crop.shape[0] / 128))
    t = float(diff_threshold)
    return np.clip((diff - t / 2) / t, 0.0, 1.0)


def composite_mask(soft_masks: list[np.ndarray], threshold: float, shrink: float) -> np.ndarray:
    """Composite 0/255 mask of one product/camera: mean -> threshold -> largest filled blob -> shrink + pad."""
    mean = np.mean(np.stack(soft_masks), axis=0)
    binary = (mean >= threshold).astype(np.uint8) * 255
    return shrink_and_pad(largest_filled(binary), shrink)


def apply_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``img`` with every pixel outside ``mask`` (0 there) set to black."""
    if mask.shape[:2] != img.shape[:2]:
        mask = cv2.resize(mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    out = img.copy()
    out[mask == 0] = 0
    return out


def _plate_crop(plates: dict[str, np.ndarray], row: dict, margin: float, size: int) -> np.ndarray:
    """The background plate cut and resized like the row's crop."""
    path = row["background_path"]
    if path not in plates:
        plates[path] = read_image(path)
    box = tuple(int(row[c]) for c in BOX_COLS)
    return crop_square(plates[path], square_box(box, margin), size)


def _mask_group(rows: list[dict], plates: dict, params: Params, out: StageOutput, tag: str) -> dict[str, dict]:
    """Masks for one product/camera; item_id -> updated columns (empty composite: masks only)."""
    crops, softs, updates = [], [], {}
    for row in rows:
        crop = read_image(row["image_path"])
        if crop.shape[0] != crop.shape[1] or (crops and crop.shape != crops[0].shape):
            raise MasksError(f"{row['image_path']}: crop of shape {crop.shape}; the detect stage writes "
                             f"square crops of one size per product/camera")
        soft = soft_foreground(crop, _plate_crop(plates, row, params.detect.margin, crop.shape[0]),
                               params.detect.diff_threshold)
        tmp, fg_path = out.path(f"fg/{safe_name(row['item_id'])}.png")
        write_image(tmp, (soft * 255).round().astype(np.uint8))
        crops.append(crop)
        softs.append(soft)
        updates[row["item_id"]] = {"fg_mask_path": fg_path}
    comp = composite_mask(softs, params.masks.threshold, params.masks.shrink)
    if not comp.any():
        return updates
    tmp, comp_path = out.path(f"composite/{tag}.png")
    write_image(tmp, comp)
    for row, crop in zip(rows, crops):
        tmp, masked_path = out.path(f"masked/{safe_name(row['item_id'])}.png")
        write_image(tmp, apply_mask(crop, comp))
        updates[row["item_id"]].update(composite_mask_path=comp_path, image_path=masked_path)
    return updates


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Soft masks, composite masks and masked crops for every detected crop of ``inp``."""
    df = read_manifest(manifest_path(inp), DETECT)
    if not params.masks.enabled:
        return skip_stage("masks", df, MASKS, inp, out_dir, "masks.enabled=false")
    has_plate = df["background_path"].notna() & df[BOX_COLS].notna().all(axis=1)
    if not has_plate.any():
        return skip_stage("masks", df, MASKS, inp, out_dir,
                          "images source: no background plates or boxes (detect did not run)")
    with stage_run("masks", out_dir) as (out, report):
        records = df.to_dict("records")
        groups: dict[tuple, list[dict]] = {}
        for row, ok in zip(records, has_plate):
            if ok:
                groups.setdefault((row["run"], row["product_id"], row["camera"]), []).append(row)
        plates: dict[str, np.ndarray] = {}
        updates: dict[str, dict] = {}
        empty = 0
        for (run_id, product, cam), rows in tqdm(groups.items(), desc="masks", unit="product",
                                                 disable=None, leave=False):
            tag = "_".join(safe_name(x) for x in (run_id, product, cam))
            got = _mask_group(rows, plates, params, out, tag)
            if not any("composite_mask_path" in u for u in got.values()):
                empty += 1
                log.warning("%s/%s/%s: composite mask is empty, crops forwarded unmasked", run_id, product, cam)
            updates.update(got)
        out_df = pd.DataFrame([{**r, **updates.get(r["item_id"], {})} for r in records], columns=MASKS.names)
        write_manifest(out_df, MASKS, out.manifest)
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
        report.notes.append(f"{len(groups) - empty} composite mask(s) (product x camera), "
                            f"shrunk by {params.masks.shrink:.0%}")
        if empty:
            report.notes.append(f"{empty} product/camera composite(s) empty: crops forwarded unmasked")
        if (~has_plate).any():
            report.notes.append(f"{int((~has_plate).sum())} row(s) without box/background forwarded unmasked")
    return report
