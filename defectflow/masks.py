"""Stage masks (DETECT -> MASKS): remove the background around each product crop.

``masks.method`` (the three inputs compared in seed 000, Tables I-II):

- ``mask`` (default): per crop a soft foreground mask from the difference to the
  background plate (cropped and resized exactly like the crop), refined edge-aware by
  a guided filter steered by the crop (``masks.refine``; the part BGMv2 plays in the
  paper, offline). Per product + camera the soft masks of its window crops are averaged
  into a composite (the linear sum of seed 000, III.B, normalised by the count),
  thresholded at ``masks.threshold``, reduced to its largest component with holes
  filled (each soft mask is first limited to the product's box in its crop, grown by
  ``BOX_GROW``: with several products in view, a touching neighbour's pixels stay out), then shrunk by ``masks.shrink`` about the centre and padded back (Fig. 4d).
  The composite is applied to every crop of that product/camera. Files kept for the
  report (Fig. 4): ``fg/`` soft masks, ``composite_raw/`` before the shrink,
  ``composite/`` the applied mask, ``masked/`` the masked crops.
- ``crop``: ``masks.shrink`` of the side cut off each side of every image, resized back
  ("images with 10% cropping"); works for image sources too.
- ``none``: the detect crops as they are (rows forwarded).
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
from defectflow.units import Mapper, Unit, UnitResult, group_units, map_units, merge_rows
from defectflow.units.core import quarantine_meta, results

log = logger("masks")

BOX_COLS = ["box_x0", "box_y0", "box_x1", "box_y1"]
GUIDED_EPS = 1e-3     # guided-filter regularisation (guide in [0, 1]): lower follows weaker edges
GUIDED_GRID = 64      # the guided filter's coefficients are fitted on about this many pixels a side
BOX_GROW = 0.03       # a soft mask is kept within the product's box in the crop, grown by this share of the crop


class MasksError(DefectflowError):
    """A crop does not match what the detect stage writes."""


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float, sub: int = 1) -> np.ndarray:
    """Edge-preserving smoothing of ``src`` (float32 HxW) steered by ``guide`` (He et al., 2010).

    ``guide``: uint8 BGR / grey (scaled to [0, 1] here) or float in [0, 1]. A colour guide
    uses the full 3x3 colour covariance per window, so an edge between two colours of equal
    brightness still steers the output. Box filters (cv2.boxFilter) of side 2 * radius + 1.
    ``sub`` > 1: the fast guided filter (He & Sun, 2015): the linear coefficients are fitted
    on a ``sub`` times smaller copy and upsampled, the output keeps the guide's full detail.
    """
    g = guide.astype(np.float32) / (255.0 if guide.dtype == np.uint8 else 1.0)
    p = src.astype(np.float32)
    h, w = p.shape
    gs, ps, r = g, p, radius
    if sub > 1:
        small = (max(1, w // sub), max(1, h // sub))
        gs = cv2.resize(g, small, interpolation=cv2.INTER_AREA)
        ps = cv2.resize(p, small, interpolation=cv2.INTER_AREA)
        r = max(1, round(radius / sub))
    k = (2 * r + 1, 2 * r + 1)
    box = lambda x: cv2.boxFilter(x, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    mean_p = box(ps)
    if gs.ndim == 2:
        mean_i = box(gs)
        a = (box(gs * ps) - mean_i * mean_p) / (box(gs * gs) - mean_i * mean_i + eps)
        b = mean_p - a * mean_i
    else:
        c = gs.shape[2]
        mean_i = box(gs)                                                  # h x w x 3
        cov_ip = box(gs * ps[:, :, None]) - mean_i * mean_p[:, :, None]   # h x w x 3
        sigma = np.empty(gs.shape[:2] + (c, c), np.float32)
        for i in range(c):
            for j in range(i, c):
                v = box(gs[:, :, i] * gs[:, :, j]) - mean_i[:, :, i] * mean_i[:, :, j]
                sigma[:, :, i, j] = sigma[:, :, j, i] = v
        sigma += eps * np.eye(c, dtype=np.float32)
        a = np.linalg.solve(sigma, cov_ip[..., None])[..., 0]             # h x w x 3
        b = mean_p - (a * mean_i).sum(axis=2)
    a, b = box(a), box(b)
    if sub > 1:
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
        b = cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR)
    return (a * g).sum(axis=2) + b if a.ndim == 3 else a * g + b


def soft_foreground(crop: np.ndarray, plate_crop: np.ndarray, diff_threshold: int,
                    refine: bool = True) -> np.ndarray:
    """Foreground likelihood in [0, 1] (float32) of a crop against its background plate.

    The per-pixel colour difference, lightly blurred, is ramped around ``diff_threshold``
    (a difference of ``diff_threshold`` maps to 0.5, half of it to 0, 1.5 times it to 1).
    ``refine``: the ramp is then refined edge-aware by a guided filter steered by the crop
    itself, so the soft mask snaps to the product's outline and noise specks fade (the
    role BGMv2's refinement plays in seed 000, here offline and without a network).
    """
    if crop.shape != plate_crop.shape:
        raise ValueError(f"crop {crop.shape} and background crop {plate_crop.shape} differ in size")
    size = crop.shape[0]
    diff = colour_diff(crop, plate_crop).astype(np.float32)
    diff = cv2.GaussianBlur(diff, (0, 0), sigmaX=max(1.0, size / 128))
    t = float(diff_threshold)
    soft = np.clip((diff - t / 2) / t, 0.0, 1.0)
    if refine:
        soft = np.clip(guided_filter(crop, soft, radius=max(2, size // 32), eps=GUIDED_EPS,
                                      sub=max(1, size // GUIDED_GRID)), 0.0, 1.0)
    return soft


def composite_mask(soft_masks: list[np.ndarray], threshold: float, shrink: float) -> np.ndarray:
    """Composite 0/255 mask of one product/camera: mean -> threshold -> largest filled blob -> shrink + pad."""
    return shrink_and_pad(raw_composite(soft_masks, threshold), shrink)


def raw_composite(soft_masks: list[np.ndarray], threshold: float) -> np.ndarray:
    """The composite before the shrink: mean of the soft masks -> threshold -> largest filled blob (0/255)."""
    mean = np.mean(np.stack(soft_masks), axis=0)
    return largest_filled((mean >= threshold).astype(np.uint8) * 255)


def crop_border(img: np.ndarray, fraction: float) -> np.ndarray:
    """Cut ``fraction`` of the side off each side of ``img`` and resize back (seed 000, "10% cropping")."""
    h, w = img.shape[:2]
    dy, dx = int(round(h * fraction)), int(round(w * fraction))
    if fraction <= 0 or 2 * dy >= h or 2 * dx >= w:
        return img.copy()
    return cv2.resize(img[dy:h - dy, dx:w - dx], (w, h), interpolation=cv2.INTER_LINEAR)


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


def box_in_crop(box: tuple[int, int, int, int], margin: float, size: int, grow: float = BOX_GROW) -> np.ndarray:
    """0/1 float32 mask (size x size) of ``box`` inside the square crop detect cut around it, grown by ``grow``."""
    sx, sy, side = square_box(box, margin)
    k = size / side
    g = grow * size
    x0, y0 = int(np.floor((box[0] - sx) * k - g)), int(np.floor((box[1] - sy) * k - g))
    x1, y1 = int(np.ceil((box[2] - sx) * k + g)), int(np.ceil((box[3] - sy) * k + g))
    out = np.zeros((size, size), np.float32)
    out[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1.0
    return out


def _mask_group(rows: list[dict], plates: dict, params: Params, out: StageOutput, tag: str) -> dict[str, dict]:
    """Masks for one product/camera; item_id -> updated columns (empty composite: masks only)."""
    crops, softs, updates = [], [], {}
    for row in rows:
        crop = read_image(row["image_path"])
        if crop.shape[0] != crop.shape[1] or (crops and crop.shape != crops[0].shape):
            raise MasksError(f"{row['image_path']}: crop of shape {crop.shape}; the detect stage writes "
                             f"square crops of one size per product/camera")
        soft = soft_foreground(crop, _plate_crop(plates, row, params.detect.margin, crop.shape[0]),
                               params.masks.diff_threshold, refine=params.masks.refine)
        soft *= box_in_crop(tuple(int(row[c]) for c in BOX_COLS), params.detect.margin, crop.shape[0])
        tmp, fg_path = out.path(f"fg/{safe_name(row['item_id'])}.png")
        write_image(tmp, (soft * 255).round().astype(np.uint8), atomic=False)
        crops.append(crop)
        softs.append(soft)
        updates[row["item_id"]] = {"fg_mask_path": fg_path}
    raw = raw_composite(softs, params.masks.threshold)
    if not raw.any():
        return updates
    comp = shrink_and_pad(raw, params.masks.shrink)
    tmp, _ = out.path(f"composite_raw/{tag}.png")          # before the shrink: for reports / figures
    write_image(tmp, raw, atomic=False)
    tmp, comp_path = out.path(f"composite/{tag}.png")
    write_image(tmp, comp, atomic=False)
    for row, crop in zip(rows, crops):
        tmp, masked_path = out.path(f"masked/{safe_name(row['item_id'])}.png")
        write_image(tmp, apply_mask(crop, comp), atomic=False)
        updates[row["item_id"]].update(composite_mask_path=comp_path, image_path=masked_path)
    return updates


def _crop_rows(records: list[dict], fraction: float, out: StageOutput) -> list[dict]:
    """masks.method=crop: every image with ``fraction`` cut off each side (resized back)."""
    rows = []
    for row in tqdm(records, desc="masks (crop)", unit="image", disable=None, leave=False):
        tmp, path = out.path(f"cropped/{safe_name(row['item_id'])}.png")
        write_image(tmp, crop_border(read_image(row["image_path"]), fraction), atomic=False)
        rows.append({**row, "image_path": path})
    return rows


def _has_plate(row: dict) -> bool:
    return isinstance(row.get("background_path"), str) and not any(pd.isna(row.get(c)) for c in BOX_COLS)


def _composite_rows(records: list[dict], params: Params, out: StageOutput) -> tuple[list[dict], dict]:
    """masks.method=mask on one unit: soft masks, composites and masked crops per product/camera."""
    groups: dict[tuple, list[dict]] = {}
    for row in records:
        if _has_plate(row):
            groups.setdefault((row["run"], row["product_id"], row["camera"]), []).append(row)
    plates: dict[str, np.ndarray] = {}
    updates: dict[str, dict] = {}
    empty = 0
    for (run_id, product, cam), rows in groups.items():
        tag = "_".join(safe_name(x) for x in (run_id, product, cam))
        got = _mask_group(rows, plates, params, out, tag)
        if not any("composite_mask_path" in u for u in got.values()):
            empty += 1
            log.warning("%s/%s/%s: composite mask is empty, crops forwarded unmasked", run_id, product, cam)
        updates.update(got)
    stats = {"groups": len(groups), "empty": empty, "no_plate": sum(not _has_plate(r) for r in records)}
    return [{**r, **updates.get(r["item_id"], {})} for r in records], stats


def _unit_inputs(rows: list[dict]) -> list[str]:
    return [r[c] for r in rows for c in ("image_path", "background_path") if isinstance(r.get(c), str)]


def units(params: Params, df: pd.DataFrame) -> list[Unit]:
    """Per video (run, camera): whole products for ``mask``; ``crop`` also cut into ``scale.unit_images`` rows."""
    chunk = params.scale.unit_images if params.masks.method == "crop" else None
    return group_units("masks", df, _unit_inputs, chunk=chunk)


def run_unit(params: Params, unit: Unit, out: StageOutput) -> UnitResult:
    if params.masks.method == "crop":
        return UnitResult(_crop_rows(unit.payload, params.masks.shrink, out), {})
    rows, stats = _composite_rows(unit.payload, params, out)
    return UnitResult(rows, stats)


def run(params: Params, inp: Path, out_dir: Path, mapper: Mapper | None = None) -> StageReport:
    """Remove the background of every detected crop of ``inp`` as ``masks.method`` says (units: see ``units``)."""
    df = read_manifest(manifest_path(inp), DETECT)
    method = params.masks.method
    if method == "none":
        return skip_stage("masks", df, MASKS, inp, out_dir, "masks.method=none: crops used as they are")
    has_plate = df["background_path"].notna() & df[BOX_COLS].notna().all(axis=1)
    if method == "mask" and not has_plate.any():
        return skip_stage("masks", df, MASKS, inp, out_dir,
                          "images source: no background plates or boxes (detect did not run)")
    with stage_run("masks", out_dir) as (out, report):
        settings = {"masks": params.masks.model_dump(mode="json"), "margin": params.detect.margin}
        outcomes = map_units("masks", params, units(params, df), run_unit, out, settings, report, mapper)
        rows = merge_rows(outcomes)
        if method == "crop":
            report.notes.append(f"{len(rows)} image(s) cropped by {params.masks.shrink:.0%} on each side")
        else:
            stats = [r.stats for r in results(outcomes)]
            n_groups, empty = sum(s["groups"] for s in stats), sum(s["empty"] for s in stats)
            no_plate = sum(s["no_plate"] for s in stats)
            report.notes.append(f"{n_groups - empty} composite mask(s) (product x camera), "
                                f"shrunk by {params.masks.shrink:.0%}")
            if empty:
                report.notes.append(f"{empty} product/camera composite(s) empty: crops forwarded unmasked")
            if no_plate:
                report.notes.append(f"{no_plate} row(s) without box/background forwarded unmasked")
        out_df = pd.DataFrame(rows, columns=MASKS.names)
        write_manifest(out_df, MASKS, out.manifest, meta={"method": method, **quarantine_meta(outcomes)})
        report.read.append(str(inp))
        report.n_in, report.n_out = len(df), len(out_df)
    return report
