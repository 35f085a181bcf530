"""Threshold stage: score the validation images and fit the decision threshold.

An image is predicted defective when ``score >= threshold``. Methods (``threshold.method``):

- ``target_tpr`` (seed 000): among thresholds whose TPR >= ``target_tpr``, the one with the
  lowest FPR (ties: the highest TPR, i.e. the lowest such threshold).
- ``f1`` (seed 003): the threshold with the highest F1 on validation.

If validation has no defective images (usual in a plant and for the MVTec ``images``
source) it falls back to the ``1 - fallback_fpr`` quantile of the good validation scores
(about ``fallback_fpr`` of good images flagged) and says so (``method_used``).
Fewer than 2 good validation images stop the stage.

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
from defectflow.fsutil import atomic_path
from defectflow.manifest import SCORES, SYNTH, read_manifest, write_manifest
from defectflow.scoring import load_model, score_items, select_rows
from defectflow.stage import StageReport, logger, manifest_path

log = logger("threshold")
MIN_GOOD = 2


class ThresholdError(DefectflowError):
    """The validation set cannot support a threshold."""


def _rates(scores: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    pred = scores >= t
    tpr = float(pred[y].mean()) if y.any() else float("nan")
    fpr = float(pred[~y].mean()) if (~y).any() else float("nan")
    return tpr, fpr


def fit_threshold(scores, labels, method: str = "target_tpr", target_tpr: float = 0.85,
                  fallback_fpr: float = 0.05) -> dict:
    """Fit a threshold on validation ``scores`` with ``labels`` (good / defect; others ignored).

    Returns ``{threshold, method, method_used, note, n_good, n_defect, tpr, fpr}``.
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
    note = ""
    if n_defect == 0:
        method_used = "fallback_fpr"
        threshold = float(np.quantile(scores[~y], 1.0 - fallback_fpr))
        note = (f"validation has no defective images: threshold = {1 - fallback_fpr:.3f} quantile of "
                f"{n_good} good validation scores (threshold.fallback_fpr = {fallback_fpr})")
    elif method == "target_tpr":
        method_used = "target_tpr"
        cands = np.unique(scores)                       # ascending; t = s flags every score >= s
        best = None
        for t in cands:
            tpr, fpr = _rates(scores, y, t)
            if tpr >= target_tpr and (best is None or fpr < best[1] or (fpr == best[1] and tpr > best[2])):
                best = (t, fpr, tpr)
        threshold = float(best[0])                      # t = min score always reaches TPR 1
    elif method == "f1":
        method_used = "f1"
        best = None
        for t in np.unique(scores):
            pred = scores >= t
            tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            if best is None or f1 > best[1]:
                best = (t, f1)
        threshold = float(best[0])
    else:
        raise ThresholdError(f"threshold.method: unknown method '{method}' (target_tpr, f1)")
    tpr, fpr = _rates(scores, y, threshold)
    return {"threshold": threshold, "method": method, "method_used": method_used, "note": note,
            "n_good": n_good, "n_defect": n_defect,
            "tpr": None if np.isnan(tpr) else tpr, "fpr": None if np.isnan(fpr) else fpr}


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
    val = select_rows(df, "val")
    n_good = int((val["label"] == "good").sum())
    if n_good < MIN_GOOD:
        raise ThresholdError(f"{src}: {n_good} good validation image(s) (split=val, is_center); need at least "
                             f"{MIN_GOOD} to fit a threshold (raise source.val_fraction or add good images)")
    model = load_model(model_dir)
    scored = score_items(val, model_dir, params, model=model, progress=True)
    tp = params.threshold
    fit = fit_threshold(scored["score"], scored["label"], tp.method, tp.target_tpr, tp.fallback_fpr)
    scored["pred_defect"] = scored["score"] >= fit["threshold"]
    s, lab = scored["score"].to_numpy(), scored["label"].to_numpy()
    auroc = None
    if fit["n_defect"] and fit["n_good"]:
        known = np.isin(lab, ["good", "defect"])
        auroc = float(roc_auc_score(lab[known] == "defect", s[known]))
    result = {
        "threshold": fit["threshold"],
        "method": tp.method,
        "method_used": fit["method_used"],
        "note": fit["note"],
        "params": tp.model_dump(mode="json"),
        "model": str(model_dir),
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
    if fit["note"]:
        report.notes.append(fit["note"])
        log.warning("threshold: %s", fit["note"])
    report.seconds = time.perf_counter() - t0
    for note in report.notes:
        log.info("threshold: %s", note)
    log.info(report.summary())
    return report
