"""Stage augment (ROI -> AUGMENT): extra copies of the good training images.

Each good train row gets ``augment.copies`` copies: random flips, a rotation
within +-rotate_deg (reflected border; black for masked images), and hue /
saturation / brightness / exposure changes (seed 003's augmentation list). Every
copy has its own generator, seeded from ``params.seed``, the item id and the copy
number, so the result does not depend on row order. All input rows are forwarded.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from defectflow.config import AugmentParams, Params
from defectflow.fsutil import read_image, write_image
from defectflow.imgops import safe_name, stable_hash
from defectflow.manifest import AUGMENT, ROI, read_manifest, write_manifest
from defectflow.stage import skip_stage
from defectflow.stage import StageOutput, StageReport, manifest_path, stage_run

# masks drawn for the original no longer line up with a flipped / rotated copy
UNALIGNED = ("fg_mask_path", "composite_mask_path", "roi_mask_path")


def _rotate(img: np.ndarray, angle: float, border: int) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def _photometric(img: np.ndarray, hue: float, sat: float, gain: float, gamma: float) -> np.ndarray:
    """Hue shift (degrees), saturation and value gains, then a gamma on the value channel."""
    f = img.astype(np.float32) / 255.0
    if f.ndim == 2:
        v = np.clip(f * gain, 0.0, 1.0) ** gamma
        return (v * 255.0).round().astype(np.uint8)
    hsv = cv2.cvtColor(f, cv2.COLOR_BGR2HSV)          # float: H in [0, 360), S and V in [0, 1]
    hsv[:, :, 0] = (hsv[:, :, 0] + hue) % 360.0
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * sat, 0.0, 1.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] * gain, 0.0, 1.0) ** gamma
    return (cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0).round().clip(0, 255).astype(np.uint8)


def augment_image(img: np.ndarray, rng: np.random.Generator, p: AugmentParams,
                  border: int = cv2.BORDER_REFLECT_101) -> np.ndarray:
    """One random augmentation of ``img`` (BGR or grey uint8); same size and type.

    ``border`` fills the corners a rotation uncovers (reflection by default; the
    stage passes black for masked images, whose background is black already).
    Draws the same numbers in the same order whatever ``p`` says, so switching one
    change off leaves the others as they were.
    """
    flip_h, flip_v = rng.random(2) < 0.5
    angle = rng.uniform(-p.rotate_deg, p.rotate_deg)
    hue = rng.uniform(-p.hue, p.hue)
    sat = 1.0 + rng.uniform(-p.saturation, p.saturation)
    gain = 1.0 + rng.uniform(-p.brightness, p.brightness)
    gamma = 1.0 + rng.uniform(-p.exposure, p.exposure)
    out = img
    if p.flip and flip_h:
        out = cv2.flip(out, 1)
    if p.flip and flip_v:
        out = cv2.flip(out, 0)
    if angle:
        out = _rotate(out, angle, border)
    return _photometric(out, hue, sat, gain, gamma)


def copy_rng(seed: int, item_id: str, k: int) -> np.random.Generator:
    """The generator of copy ``k`` of ``item_id`` (independent of any other row)."""
    return np.random.default_rng([int(seed), stable_hash(item_id), int(k)])


def is_masked(row: dict) -> bool:
    """The row's image has a black background (composite-masked or a circle ROI)."""
    found = row.get("roi_found")
    return pd.notna(row.get("composite_mask_path")) or (pd.notna(found) and bool(found))


def _copies(row: dict, params: Params, out: StageOutput) -> list[dict]:
    """The augmented rows of one original row (images written)."""
    img = read_image(row["image_path"])
    border = cv2.BORDER_CONSTANT if is_masked(row) else cv2.BORDER_REFLECT_101
    rows = []
    for k in range(params.augment.copies):
        new_id = f"{row['item_id']}_aug{k}"
        aug = augment_image(img, copy_rng(params.seed, row["item_id"], k), params.augment, border)
        tmp, recorded = out.path(f"images/{safe_name(new_id)}.png")
        write_image(tmp, aug)
        rows.append({**row, **dict.fromkeys(UNALIGNED), "item_id": new_id, "image_path": recorded,
                     "augment_of": row["item_id"]})
    return rows


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Forward every row of ``inp`` and add augmented copies of the good training rows."""
    df = read_manifest(manifest_path(inp), ROI)
    if not params.augment.enabled:
        return skip_stage("augment", df, AUGMENT, inp, out_dir, "augment.enabled=false")
    if params.augment.copies == 0:
        return skip_stage("augment", df, AUGMENT, inp, out_dir, "augment.copies=0")
    is_good_train = (df["split"] == "train") & (df["label"] == "good")
    with stage_run("augment", out_dir) as (out, report):
        rows = []
        for row, good in tqdm(zip(df.to_dict("records"), is_good_train), total=len(df),
                              desc="augment", unit="image", disable=None, leave=False):
            rows.append({**row, "augment_of": None})
            if good:
                rows.extend(_copies(row, params, out))
        out_df = pd.DataFrame(rows, columns=AUGMENT.names)
        write_manifest(out_df, AUGMENT, out.manifest, meta={"copies": params.augment.copies})
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
        report.notes.append(f"{int(is_good_train.sum())} good training image(s) x {params.augment.copies} "
                            f"cop(ies) = {len(out_df) - len(df)} augmented row(s) added")
    return report
