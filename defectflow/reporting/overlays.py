"""Report images: thumbnails, and per flagged product one tile per camera (the crop, the conv head's
heat map with its boxes, the image head's gradient map)."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.fsutil import ImageReadError, read_image
from defectflow.stage import logger

log = logger("report")
THUMB_PX = 160


def encode_thumb(img: np.ndarray, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG of a BGR uint8 image shrunk to ``size`` px on its longer side."""
    h, w = img.shape[:2]
    f = size / max(h, w)
    if f < 1:
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return base64.b64encode(buf.tobytes()).decode() if ok else None


def thumbnail(path: str | Path, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG of ``path`` shrunk to ``size`` px on its longer side; None if unreadable."""
    try:
        img = read_image(path, cv2.IMREAD_COLOR)
    except (ImageReadError, TypeError, ValueError):
        return None
    return encode_thumb(img, size)


def flagged_ids(verdicts: pd.DataFrame, limit: int) -> list[str]:
    """The flagged products the report shows: highest score first."""
    flagged = verdicts[verdicts["verdict"] == "defect"].sort_values("max_score", ascending=False)
    return [str(p) for p in flagged["product_id"].head(limit)]


def camera_views(scored: pd.DataFrame, product_ids: list[str]) -> dict[str, list[dict]]:
    """product -> its highest-scoring row per camera (sorted by camera)."""
    out = {}
    for pid in product_ids:
        rows = scored[scored["product_id"].astype(str) == pid]
        best = rows.sort_values("score", ascending=False).drop_duplicates("camera").sort_values("camera")
        out[pid] = best.to_dict("records")
    return out


def product_tiles(scored: pd.DataFrame, verdicts: pd.DataFrame, amaps: "np.ndarray | dict | None",
                  boxes: pd.DataFrame, conv_info: dict | None, params,
                  gradient_model: Path | None = None) -> tuple[dict, str]:
    """(product -> [{camera, score, flagged, crop, overlay}], overlay title) for the flagged products shown:
    every camera's crop and, with a conv head, its heat map + boxes (one colour range for all: the
    threshold stage's ``vmin``/``vmax``), and/or the image head's gradient map, side by side.
    ``amaps``: the maps aligned with ``scored``'s rows, or item_id -> map (at least the shown views)."""
    if amaps is not None or gradient_model is not None:
        from defectflow.anomaly_maps import Box, draw_boxes, load_rgb, overlay
    else:                                                   # crops only: no torch import
        def load_rgb(path):
            return read_image(path, cv2.IMREAD_COLOR)           # only checked for readability here

    views = camera_views(scored, flagged_ids(verdicts, params.evaluate.max_report_images))
    maps_of = amaps if isinstance(amaps, dict) or amaps is None else dict(zip(scored["item_id"], amaps))
    loaded = []
    for pid, recs in views.items():
        for rec in recs:
            try:
                loaded.append((pid, rec, load_rgb(rec["image_path"])))
            except (ImageReadError, TypeError, ValueError):
                loaded.append((pid, rec, None))
    grads = None
    readable = [img for _, _, img in loaded if img is not None]
    if gradient_model is not None and readable:
        from defectflow.gradient_maps import gradient_maps
        from defectflow.scoring import load_model
        t0 = time.perf_counter()
        grads = iter(gradient_maps(load_model(gradient_model), readable, params))
        log.info("gradient maps of %d images in %.1f s", len(readable), time.perf_counter() - t0)
    out: dict[str, list[dict]] = {pid: [] for pid in views}
    for pid, rec, img in loaded:
        tile = {"camera": str(rec["camera"]), "score": float(rec["score"]), "flagged": bool(rec.get("pred_defect")),
                "crop": None, "overlay": None}
        if img is not None:
            tile["crop"] = thumbnail(rec["image_path"])
            tiles = []
            if maps_of is not None and rec["item_id"] in maps_of:
                mine = boxes[boxes["item_id"] == rec["item_id"]]
                bx = [Box(*(int(r[c]) for c in ("x0", "y0", "x1", "y1")), float(r["confidence"]),
                          float(r["score_max"]), float(r["score_mean"]), int(r["area"])) for _, r in mine.iterrows()]
                tiles.append(draw_boxes(overlay(img, maps_of[rec["item_id"]], conv_info["vmin"], conv_info["vmax"]),
                                        bx))
            if grads is not None:
                g = next(grads)
                tiles.append(overlay(img, g, float(np.quantile(g, 0.5)), float(g.max())))
            if tiles:
                tile["overlay"] = encode_thumb(np.hstack(tiles), 2 * THUMB_PX if len(tiles) > 1 else THUMB_PX)
        out[pid].append(tile)
    title = " | ".join(t for t, on in (("heat map + boxes", amaps is not None), ("gradient map", grads is not None))
                       if on)
    return out, title
