"""Evaluate stage: score the test images, judge products, write metrics, plots and the QA report.

Test rows: ``split == test``, ``is_center`` originals (one image per product per camera).
Images labelled ``unknown`` are scored and judged but left out of every metric.
Writes into ``out_dir`` (atomically replaced):

- ``metrics.json``        ``image_auroc`` (null with a note if test has one class), accuracy,
                          precision, recall, f1, fpr at the threshold, counts, per-defect-type
                          AUROC, product-level accuracy
- ``roc.csv``             ``fpr,tpr,threshold``;  ``scores_hist.csv``  ``score,count,good,defect,unknown``
- ``scores.parquet``      SCORES;  ``verdicts.parquet``  VERDICTS
- ``roc.png``, ``scores_hist.png``, ``report.html`` (self-contained)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.manifest import SCORES, SYNTH, VERDICTS, read_manifest, write_manifest
from defectflow.report import hist_plot, roc_plot, write_report
from defectflow.scoring import judge, select_rows
from defectflow.stage import StageReport, logger, manifest_path, stage_run

log = logger("evaluate")
HIST_BINS = 30


class EvaluateError(DefectflowError):
    """The evaluation inputs are missing or invalid."""


def read_threshold(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"{path}: threshold file not found (has the threshold stage run?)")
    try:
        info = json.loads(path.read_text())
        float(info["threshold"])
    except (ValueError, KeyError, TypeError) as err:
        raise EvaluateError(f"{path}: not a valid threshold file ({err})") from None
    return info


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def image_metrics(scores, labels, defect_types, threshold: float) -> dict:
    """Image-level metrics at ``threshold``; ``unknown`` labels excluded."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, dtype=object)
    types = np.asarray(defect_types, dtype=object)
    known = np.isin(labels, ["good", "defect"])
    s, y, t = scores[known], labels[known] == "defect", types[known]
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    tn, fn = int((~pred & ~y).sum()), int((~pred & y).sum())
    n = len(s)
    notes = []
    auroc = _auroc(y, s)
    if auroc is None:
        notes.append(f"image_auroc is null: the test set has only one class "
                     f"({int(y.sum())} defective, {int((~y).sum())} good labelled images)")
    per_type = {}
    for name in sorted({str(x) for x in t[y] if x is not None and not (isinstance(x, float) and math.isnan(x))}):
        sel = ~y | (t == name)
        per_type[name] = {"n": int((t[y] == name).sum()), "auroc": _auroc(y[sel], s[sel])}
    return {
        "image_auroc": auroc,
        "threshold": float(threshold),
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else (0.0 if fp + fn else None),
        "fpr": fp / (fp + tn) if fp + tn else None,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n_test": int(len(scores)), "n_good": int((~y).sum()), "n_defect": int(y.sum()),
        "n_unknown": int((~known).sum()),
        "per_defect_type": per_type,
        "notes": notes,
    }


def product_metrics(verdicts: pd.DataFrame) -> dict:
    known = verdicts[verdicts["label"].isin(["good", "defect"])]
    correct = int((known["label"] == known["verdict"]).sum())
    return {
        "n_products": int(len(verdicts)),
        "n_products_flagged": int((verdicts["verdict"] == "defect").sum()),
        "product_accuracy": correct / len(known) if len(known) else None,
        "product_recall": (float(((known["label"] == "defect") & (known["verdict"] == "defect")).sum()
                                 / (known["label"] == "defect").sum()) if (known["label"] == "defect").any() else None),
    }


def roc_table(scores, labels) -> pd.DataFrame:
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    known = np.isin(lab, ["good", "defect"])
    y = lab[known] == "defect"
    if not 0 < y.sum() < len(y):
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thr = roc_curve(y, s[known])
    thr = np.where(np.isfinite(thr), thr, np.nan)          # sklearn's first point is +inf
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def histogram_range(scores, labels, threshold: float) -> tuple[float, float]:
    """Bin range that shows the good scores and the threshold: scores can span orders of magnitude
    (far outliers get huge NLLs), so the top is ``max(good max, threshold + 3 * (threshold - min))``,
    capped at the largest score; higher scores land in the last bin."""
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    lo, top = float(s.min()), float(s.max())
    good = s[lab == "good"]
    hi = max(float(good.max()) if len(good) else -np.inf, threshold + 3.0 * (threshold - lo))
    hi = min(hi, top)
    return (lo, hi) if hi > lo else (lo, top)


def histogram_table(scores, labels, threshold: float | None = None, bins: int = HIST_BINS) -> pd.DataFrame:
    """Counts per score bin (``score`` = bin centre), all and per label; see :func:`histogram_range`."""
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    cols = ["score", "count", "good", "defect", "unknown"]
    if len(s) == 0:
        return pd.DataFrame(columns=cols)
    lo, hi = histogram_range(s, lab, float(np.median(s) if threshold is None else threshold))
    edges = np.histogram_bin_edges(s, bins=bins, range=(lo, hi) if hi > lo else None)
    s = np.clip(s, edges[0], edges[-1])
    out = {"score": (edges[:-1] + edges[1:]) / 2, "count": np.histogram(s, edges)[0]}
    for name in ("good", "defect", "unknown"):
        out[name] = np.histogram(s[lab == name], edges)[0]
    return pd.DataFrame(out, columns=cols)


def run(params: Params, inp: Path, model_dir: Path, threshold_path: Path, out_dir: Path) -> StageReport:
    with stage_run("evaluate", out_dir) as (out, report):
        src = manifest_path(inp)
        df = read_manifest(src, SYNTH)
        thr_info = read_threshold(threshold_path)
        threshold = float(thr_info["threshold"])
        test = select_rows(df, "test")
        scored, verdicts = judge(test, model_dir, params, threshold, progress=True)
        metrics = image_metrics(scored["score"], scored["label"], scored["defect_type"], threshold)
        metrics.update(product_metrics(verdicts))
        metrics["threshold_method"] = thr_info.get("method_used")
        if test.empty:
            metrics["notes"].append("no test images (split=test, is_center)")
        roc = roc_table(scored["score"], scored["label"])
        hist = histogram_table(scored["score"], scored["label"], threshold)
        op = (metrics["fpr"], metrics["recall"]) if metrics["fpr"] is not None and metrics["recall"] is not None else None

        files = {}
        for name in ("metrics.json", "roc.csv", "scores_hist.csv", "scores.parquet", "verdicts.parquet",
                     "roc.png", "scores_hist.png", "report.html"):
            files[name] = out.path(name)[0]
        files["metrics.json"].write_text(json.dumps(metrics, indent=2) + "\n")
        roc.to_csv(files["roc.csv"], index=False)
        hist.to_csv(files["scores_hist.csv"], index=False)
        write_manifest(scored[[c for c in scored.columns if c in SCORES.names]], SCORES, files["scores.parquet"],
                       meta={"threshold": threshold})
        write_manifest(verdicts, VERDICTS, files["verdicts.parquet"], meta={"threshold": threshold})
        roc_png = roc_plot(roc, metrics["image_auroc"], op)
        clipped = bool(len(scored)) and float(scored["score"].max()) > histogram_range(
            scored["score"], scored["label"], threshold)[1]
        hist_png = hist_plot(hist, threshold, clipped)
        for name, data in (("roc.png", roc_png), ("scores_hist.png", hist_png)):
            if data:
                files[name].write_bytes(data)
            else:
                del files[name]
        notes = [thr_info["note"]] if thr_info.get("note") else []
        write_report(files["report.html"], metrics, verdicts, scored, threshold, str(thr_info.get("method_used")),
                     roc_png, hist_png, max_images=params.evaluate.max_report_images, notes=notes)
        report.read += [str(src), str(model_dir), str(threshold_path)]
        report.wrote += [str(Path(out_dir) / n) for n in files]
        report.n_in, report.n_out = len(df), len(scored)
        auroc = metrics["image_auroc"]
        report.notes.append(f"{len(scored)} test images, {len(verdicts)} products "
                            f"({metrics['n_products_flagged']} flagged); image AUROC "
                            f"{'n/a' if auroc is None else f'{auroc:.4f}'}, accuracy {metrics['accuracy']}")
        report.notes.extend(metrics["notes"])
    return report
