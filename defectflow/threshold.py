"""Threshold stage: score the validation images and fit the decision threshold.

An image is predicted defective when ``score >= threshold``. Methods (``threshold.method``):

- ``target_fpr`` (default): the false-alarm rate the line can afford, ``threshold.target_fpr``,
  from the good calibration images alone: a split-conformal quantile
  (:func:`defectflow.false_alarms.conformal_threshold`), so future good images are flagged at
  most at that rate while they score like the calibration ones. Too few good images for the rate
  asked: the largest good score, and the stage says how many good images the rate needs.
- ``target_tpr`` (seed 000): among thresholds whose TPR >= ``target_tpr``, the one with the
  lowest FPR (ties: the highest TPR, i.e. the lowest such threshold).
- ``f1`` (seed 003): the threshold with the highest F1 on validation.

``target_tpr`` and ``f1`` need defective validation images; without them (usual in a plant and
for the MVTec ``images`` source) the stage uses ``target_fpr`` and says so (``method_used``).
Fewer than 2 good calibration images stop the stage.

Only *calibration* validation images are used: the good ones that picked the training epoch or
standardised the heads' scores (``model/val_split.json``) are left out, so the threshold is not
fitted on images the model was selected or scaled on. Operator bands (:func:`fit_bands`): ``good``
below ``low``, ``review`` from ``low`` to ``high``, ``bad`` at or above ``high``.

The threshold is fitted on ``score``: the ``train.score_from`` head's. With a conv head the
stage also fits the **map threshold** (``threshold.json["conv"]``): a map pixel at or above it is
defective, its connected regions are the boxes: the conformal ``target_fpr`` threshold of the good
calibration images' map maxima (at most about ``target_fpr`` of good images get a box). Also the overlay colour range: ``vmin`` = median of
the good calibration maps, ``vmax = vmin + 3 (map threshold - vmin)``.

Writes ``threshold.json`` (atomically) and the scored validation rows (SCORES schema).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.false_alarms import conformal_threshold
from defectflow.fsutil import atomic_path
from defectflow.manifest import SCORES, SYNTH, read_manifest, write_manifest
from defectflow.scoring import HEADS, calibration_rows, load_heads, score_with_maps, select_rows
from defectflow.stage import StageReport, logger, manifest_path

log = logger("threshold")
MIN_GOOD = 2
METHODS = ("target_fpr", "target_tpr", "f1")


class ThresholdError(DefectflowError):
    """The validation set cannot support a threshold."""


def _rates(scores: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    pred = scores >= t
    tpr = float(pred[y].mean()) if y.any() else float("nan")
    fpr = float(pred[~y].mean()) if (~y).any() else float("nan")
    return tpr, fpr


def fit_threshold(scores, labels, method: str = "target_fpr", target_tpr: float = 0.85,
                  target_fpr: float = 0.05) -> dict:
    """Fit a threshold on validation ``scores`` with ``labels`` (good / defect; others ignored).

    Returns ``{threshold, method, method_used, note, n_good, n_defect, tpr, fpr, conformal}``
    (``conformal``: :func:`~defectflow.false_alarms.conformal_threshold`'s fit when it was used).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=object)
    keep = np.isin(labels, ["good", "defect"])
    scores, y = scores[keep], labels[keep] == "defect"
    n_good, n_defect = int((~y).sum()), int(y.sum())
    if n_good < MIN_GOOD:
        raise ThresholdError(f"need at least {MIN_GOOD} good validation images to fit a threshold, got {n_good}")
    if not np.isfinite(scores).all():
        raise ThresholdError("validation scores contain NaN or inf")
    if method not in METHODS:
        raise ThresholdError(f"threshold.method: unknown method '{method}' ({', '.join(METHODS)})")
    notes, conformal = [], None
    method_used = method
    if method != "target_fpr" and n_defect == 0:
        method_used = "target_fpr"
        notes.append(f"validation has no defective images: threshold.method {method} needs them, so the threshold "
                     f"holds the false-alarm rate threshold.target_fpr = {target_fpr:g} instead")
    if method_used == "target_fpr":
        conformal = conformal_threshold(scores[~y], target_fpr)
        threshold = conformal["threshold"]
        notes.append(f"threshold = the {conformal['k']}-th lowest of {n_good} good calibration scores (conformal: "
                     f"future good images flagged at a rate of at most {conformal['expected_fpr']:.3g}, "
                     f"target {target_fpr:g})")
        if not conformal["enough"]:
            notes.append(conformal["note"])
    elif method_used == "target_tpr":
        cands = np.unique(scores)                       # ascending; t = s flags every score >= s
        best = None
        for t in cands:
            tpr, fpr = _rates(scores, y, t)
            if tpr >= target_tpr and (best is None or fpr < best[1] or (fpr == best[1] and tpr > best[2])):
                best = (t, fpr, tpr)
        threshold = float(best[0])                      # t = min score always reaches TPR 1
    else:
        best = None
        for t in np.unique(scores):
            pred = scores >= t
            tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            if best is None or f1 > best[1]:
                best = (t, f1)
        threshold = float(best[0])
    tpr, fpr = _rates(scores, y, threshold)
    return {"threshold": threshold, "method": method, "method_used": method_used, "note": "; ".join(notes),
            "n_good": n_good, "n_defect": n_defect, "conformal": conformal,
            "tpr": None if np.isnan(tpr) else tpr, "fpr": None if np.isnan(fpr) else fpr}


def fit_bands(scores, labels, threshold: float, review_quantile: float = 0.90) -> dict:
    """Operator bands from the validation score histogram.

    ``low = min(threshold, q_review(good))``, ``high = max(threshold, max(good))``: below ``low``
    an image passes (it looks like the bulk of good images), at or above ``high`` it is worse than
    every good validation image (reject), in between a person should look. Also the share of
    validation images per band and label.
    """
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    good = s[lab == "good"]
    low = min(float(threshold), float(np.quantile(good, review_quantile)))
    high = max(float(threshold), float(good.max()))
    band = band_of(s, low, high)
    share = {}
    for name in ("good", "defect"):
        sel = lab == name
        if sel.any():
            share[name] = {b: float((band[sel] == b).mean()) for b in ("good", "review", "bad")}
    return {"low": low, "high": high, "review_quantile": review_quantile,
            "rule": "good: score < low; review: low <= score < high; bad: score >= high",
            "val_share": share}


def band_of(scores, low: float, high: float) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    return np.where(s >= high, "bad", np.where(s >= low, "review", "good")).astype(object)


def fit_map_threshold(scored, amaps: np.ndarray, threshold: float, scored_by: str, params: Params) -> dict:
    """The conv head's map (pixel / box) threshold and overlay colour range from calibration rows: the
    conformal ``threshold.target_fpr`` threshold of the good calibration images' map maxima (at most about
    ``target_fpr`` of good images get a box)."""
    lab = scored["label"].to_numpy()
    good = lab == "good"
    if amaps is None or not good.any():
        raise ThresholdError("no good calibration maps to fit the conv head's map threshold on")
    gmaps = amaps[good]
    fpr = params.threshold.target_fpr
    fit = conformal_threshold(gmaps.reshape(len(gmaps), -1).max(axis=1), fpr)
    thr = fit["threshold"]
    rule = (f"the {fit['k']}-th lowest map maximum of {fit['n']} good calibration images (conformal, "
            f"threshold.target_fpr = {fpr:g})")
    vmin = float(np.median(gmaps))
    vmax = vmin + 3.0 * max(thr - vmin, 1e-6)
    s = scored[HEADS["conv"]].to_numpy()
    return {"map_threshold": thr, "rule": rule, "vmin": vmin, "vmax": vmax,
            "maps": params.maps.model_dump(mode="json"),
            "good_with_box_share": float((gmaps.reshape(len(gmaps), -1).max(axis=1) >= thr).mean()),
            "good_scores": _stats(s[good]), "defect_scores": _stats(s[lab == "defect"])}


def _map_summary(scored, amaps: np.ndarray, thr: float, params: Params) -> None:
    """Fill ``map_area`` and ``n_boxes`` of ``scored`` (in place) at the map threshold."""
    from defectflow.anomaly_maps import boxes_from_map

    flat = amaps.reshape(len(amaps), -1)
    scored["map_area"] = (flat >= thr).mean(axis=1)
    scored["n_boxes"] = [len(boxes_from_map(a, thr, min_area=params.maps.min_area)) for a in amaps]


def _stats(x: np.ndarray) -> dict | None:
    if len(x) == 0:
        return None
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max())}


def run(params: Params, inp: Path, model_dir: Path, out_path: Path, scores_path: Path) -> StageReport:
    t0 = time.perf_counter()
    report = StageReport("threshold")
    src = manifest_path(inp)
    df = read_manifest(src, SYNTH)
    val_all = select_rows(df, "val")
    val, calib_note = calibration_rows(val_all, model_dir)
    n_good = int((val["label"] == "good").sum())
    if n_good < MIN_GOOD:
        raise ThresholdError(f"{src}: {n_good} good calibration image(s) (split=val, is_center, not used to "
                             f"pick the epoch); need at least {MIN_GOOD} to fit a threshold (raise "
                             "source.val_fraction, add good images, or lower train.select_fraction)")
    heads = load_heads(model_dir)
    scored, amaps = score_with_maps(val, model_dir, params, model=heads, progress=True,
                                    keep_maps=heads.conv is not None)
    skipped = scored.attrs.get("skipped") or []
    scored_by = scored.attrs["scored_by"]
    tp = params.threshold
    fit = fit_threshold(scored["score"], scored["label"], tp.method, tp.target_tpr, tp.target_fpr)
    bands = fit_bands(scored["score"], scored["label"], fit["threshold"], tp.review_quantile)
    scored["pred_defect"] = scored["score"] >= fit["threshold"]
    conv = None
    if heads.conv is not None:
        conv = fit_map_threshold(scored, amaps, fit["threshold"], scored_by, params)
        _map_summary(scored, amaps, conv["map_threshold"], params)
    del amaps
    s, lab = scored["score"].to_numpy(), scored["label"].to_numpy()
    s_good = s[lab == "good"]
    auroc = None
    if fit["n_defect"] and fit["n_good"]:
        known = np.isin(lab, ["good", "defect"])
        auroc = float(roc_auc_score(lab[known] == "defect", s[known]))
    result = {
        "threshold": fit["threshold"],
        "score_from": scored_by,
        "heads": list(heads.names),
        "conv": conv,
        "method": tp.method,
        "method_used": fit["method_used"],
        "note": fit["note"],
        "params": tp.model_dump(mode="json"),
        "model": str(model_dir),
        "bands": bands,
        "calibration": calib_note,
        "skipped_images": [{"path": p, "error": m} for p, m in skipped],
        "target_fpr": tp.target_fpr,
        "conformal": fit["conformal"],
        "calibration_good_scores": sorted(float(v) for v in s_good),
        "val": {"n": int(len(scored)), "n_good": fit["n_good"], "n_defect": fit["n_defect"],
                "n_unknown": int((~np.isin(lab, ["good", "defect"])).sum()),
                "tpr": fit["tpr"], "fpr": fit["fpr"], "auroc": auroc,
                "good_scores": _stats(s[lab == "good"]), "defect_scores": _stats(s[lab == "defect"])},
    }
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    write_manifest(scored[[c for c in scored.columns if c in SCORES.names]], SCORES, scores_path,
                   meta={"threshold": fit["threshold"], "method_used": fit["method_used"]})
    report.read += [str(src), str(model_dir)]
    report.wrote += [str(out_path), str(scores_path)]
    report.n_in, report.n_out = len(df), len(scored)
    report.notes.append(f"threshold {fit['threshold']:.5g} by {fit['method_used']} on {len(scored)} validation "
                        f"images ({fit['n_good']} good, {fit['n_defect']} defective); val TPR {fit['tpr']}, "
                        f"FPR {fit['fpr']}")
    report.notes.append(f"calibration: {calib_note}")
    report.notes.append(f"heads: {', '.join(heads.names)}; score from the {scored_by} head")
    if conv is not None:
        report.notes.append(f"map threshold {conv['map_threshold']:.5g} ({conv['rule']})")
    report.notes.append(f"operator bands: good < {bands['low']:.5g} <= review < {bands['high']:.5g} <= bad")
    if skipped:
        report.notes.append(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(p for p, _ in skipped))
    if fit["note"]:
        report.notes.append(fit["note"])
        worry = fit["method_used"] != tp.method or (fit["conformal"] and not fit["conformal"]["enough"])
        (log.warning if worry else log.info)("threshold: %s", fit["note"])
    report.seconds = time.perf_counter() - t0
    for note in report.notes:
        log.info("threshold: %s", note)
    log.info(report.summary())
    return report
