"""Evaluate stage: score the test images, judge products, write metrics, plots and the QA report.

Test rows: ``split == test``, ``is_center`` originals (one image per product per camera).
Images labelled ``unknown`` are scored and judged but left out of every metric.
Writes into ``out_dir`` (atomically replaced):

- ``metrics.json``        ``image_auroc`` (null with a note if test has one class) and its
                          stratified bootstrap 95 % CI (``image_auroc_ci``), accuracy,
                          precision, recall, f1, fpr at the threshold, counts, per-defect-type
                          AUROC, product-level accuracy
- ``roc.csv``             ``fpr,tpr,threshold``;  ``scores_hist.csv``  ``score,count,good,defect,unknown``
- ``scores.parquet``      SCORES;  ``verdicts.parquet``  VERDICTS
- ``roc.png``, ``scores_hist.png``, ``report.html`` (self-contained)
- with a conv head: ``pixel_auroc`` in metrics.json (over every pixel of the test images at
  ``train.image_size``, good images as all-zero masks; null with a note when no test row has a
  ground-truth mask), ``heads`` (image AUROC of every head: ``score`` is ``train.score_from``'s),
  ``boxes.parquet`` (a row per box of every flagged image, original-image pixels, ``x1``/``y1``
  exclusive; :data:`BOX_COLUMNS`), and heat-map + box overlays of flagged products in report.html
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from defectflow.annotate import annotate_videos
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.false_alarms import false_alarm_summary
from defectflow.manifest import SCORES, SYNTH, VERDICTS, read_manifest, write_manifest
from defectflow.reporting.build import ReportInputs, build_report
from defectflow.reporting.gallery import previous_run
from defectflow.reporting.plots import confusion_table, hist_plot, labelled, pr_plot, pr_table, roc_plot
from defectflow.scoring import HEADS, MODEL_FILE, product_verdicts, score_with_maps, select_rows
from defectflow.stage import StageReport, logger, manifest_path, stage_run

log = logger("evaluate")
HIST_BINS = 30


BOX_COLUMNS = {"item_id": "string", "product_id": "string", "camera": "string", "image_path": "string",
               "label": "string", "defect_type": "string", "score": "float64", "rank": "int64",
               "x0": "int64", "y0": "int64", "x1": "int64", "y1": "int64", "confidence": "float64",
               "score_max": "float64", "score_mean": "float64", "area": "int64"}


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


def bootstrap_auroc_ci(y: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> list[float] | None:
    """Percentile CI of the AUROC over ``n`` stratified resamples (goods and defects resampled
    separately, so every resample has both classes); None with one class or ``n == 0``."""
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    pos, neg = s[y], s[~y]
    if n <= 0 or not len(pos) or not len(neg):
        return None
    rng = np.random.default_rng(seed)
    vals = np.empty(n)
    for i in range(n):
        p = np.sort(pos[rng.integers(0, len(pos), len(pos))])
        q = np.sort(neg[rng.integers(0, len(neg), len(neg))])
        # AUROC = P(pos > neg) + 0.5 P(pos == neg), by counting with sorted arrays
        less = np.searchsorted(q, p, side="left")
        less_eq = np.searchsorted(q, p, side="right")
        vals[i] = (less.sum() + 0.5 * (less_eq - less).sum()) / (len(p) * len(q))
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def image_metrics(scores, labels, defect_types, threshold: float, bootstrap: int = 1000, seed: int = 0,
                  bands: dict | None = None) -> dict:
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
    ci = bootstrap_auroc_ci(y, s, bootstrap, seed) if auroc is not None else None
    band_counts = None
    if bands:
        from defectflow.threshold import band_of
        b = band_of(s, bands["low"], bands["high"])
        band_counts = {name: {k: int(((b == k) & sel).sum()) for k in ("good", "review", "bad")}
                       for name, sel in (("good", ~y), ("defect", y))}
    per_type = {}
    for name in sorted({str(x) for x in t[y] if x is not None and not (isinstance(x, float) and math.isnan(x))}):
        sel = ~y | (t == name)
        per_type[name] = {"n": int((t[y] == name).sum()), "auroc": _auroc(y[sel], s[sel])}
    return {
        "image_auroc": auroc,
        "image_auroc_ci": ci,
        "image_auroc_ci_method": f"stratified bootstrap, {bootstrap} resamples, 95 % percentile" if ci else None,
        "threshold": float(threshold),
        "bands": ({"low": bands["low"], "high": bands["high"], "test_counts": band_counts} if bands else None),
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
    """``fpr,tpr,threshold`` over the labelled images (empty with one class)."""
    both = labelled(scores, labels)
    if both is None:
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thr = roc_curve(*both)
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
        conv_info = thr_info.get("conv")
        map_thr = float(conv_info["map_threshold"]) if conv_info else None
        scored, amaps = score_with_maps(test, model_dir, params, progress=True, keep_maps=True,
                                        map_threshold=map_thr)
        scored_by = scored.attrs["scored_by"]
        if thr_info.get("score_from", "image") != scored_by:
            raise EvaluateError(f"{threshold_path}: the threshold was fitted on the {thr_info.get('score_from')} "
                                f"head's scores but the score now comes from the {scored_by} head: rerun threshold")
        if amaps is not None and map_thr is None:
            raise EvaluateError(f"{threshold_path}: no map threshold for the conv head: rerun threshold")
        scored["pred_defect"] = scored["score"] >= threshold
        verdicts = product_verdicts(scored, threshold)
        metrics = image_metrics(scored["score"], scored["label"], scored["defect_type"], threshold,
                                params.evaluate.bootstrap, params.seed, thr_info.get("bands"))
        metrics["score_from"] = scored_by
        if scored_by == "fused":
            metrics["notes"].append("score = mean of the image and conv heads' scores, each counted in standard "
                                    "deviations from the good validation images (models/model/fusion.json): "
                                    "about 0 for a typical good product")
        metrics["heads"] = {h: {"image_auroc": _auroc_of(scored[col], scored["label"])}
                            for h, col in HEADS.items() if col in scored.columns}
        metrics["pixel_auroc"] = None
        boxes = empty_boxes()
        if amaps is not None:
            metrics["pixel_auroc"], note = pixel_metric(scored, amaps)
            if note:
                metrics["notes"].append(note)
            boxes = flagged_boxes(scored, amaps, map_thr, params)
            metrics["map_threshold"] = map_thr
            metrics["n_boxes"] = int(len(boxes))
            metrics["n_flagged_images_with_box"] = int(boxes["item_id"].nunique())
        else:
            metrics["notes"].append("pixel_auroc is null: no conv head (train.head: image)")
        skipped = scored.attrs.get("skipped") or []
        if skipped:
            metrics["skipped_images"] = [{"path": p, "error": m} for p, m in skipped]
            metrics["notes"].append(f"skipped {len(skipped)} unreadable test image(s) (train.on_bad_image: skip): "
                                    + "; ".join(p for p, _ in skipped))
        metrics.update(product_metrics(verdicts))
        metrics["threshold_method"] = thr_info.get("method_used")
        metrics["false_alarms"] = fa = false_alarm_summary(
            scored.loc[scored["label"] == "good", "score"], threshold, thr_info)
        if fa["shift"] and fa["shift"]["shifted"]:
            metrics["notes"].append(fa["shift"]["message"])
        if fa["test_at_most_target"] is False:
            metrics["notes"].append(f"test false-alarm rate {fa['test']['rate']:.3g} (95% CI {fa['test']['ci95'][0]:.3g}-"
                                    f"{fa['test']['ci95'][1]:.3g}) is above the target {fa['target']:g}")
        if test.empty:
            metrics["notes"].append("no test images (split=test, is_center)")
        roc = roc_table(scored["score"], scored["label"])
        hist = histogram_table(scored["score"], scored["label"], threshold)
        op = (metrics["fpr"], metrics["recall"]) if metrics["fpr"] is not None and metrics["recall"] is not None else None

        files = {}
        for name in ("metrics.json", "roc.csv", "pr.csv", "confusion.csv", "scores_hist.csv", "scores.parquet",
                     "verdicts.parquet", "boxes.parquet", "roc.png", "scores_hist.png"):
            files[name] = out.path(name)[0]
        boxes.astype(BOX_COLUMNS).to_parquet(files["boxes.parquet"], index=False)
        gradient = params.evaluate.gradient_maps and (Path(model_dir) / MODEL_FILE).is_file()
        if params.evaluate.gradient_maps and not gradient:
            metrics["notes"].append("no gradient maps: they need the image head (train.head: image or both)")
        files["metrics.json"].write_text(json.dumps(metrics, indent=2) + "\n")
        roc.to_csv(files["roc.csv"], index=False)
        pr = pr_table(scored["score"], scored["label"])
        pr.to_csv(files["pr.csv"], index=False)
        confusion_table(scored["label"], scored["pred_defect"]).to_csv(files["confusion.csv"], index=False)
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
        videos = []
        if params.evaluate.video:
            window = df[(df["split"] == "test") & df["augment_of"].isna() & ~df["synthetic"].astype(bool)]
            videos = annotate_videos(window, scored, verdicts, threshold, out.tmp / "videos")
        notes = [thr_info["note"]] if thr_info.get("note") else []
        if thr_info.get("calibration"):
            notes.append(f"threshold calibration: {thr_info['calibration']}")
        plots = {"ROC curve": roc_png, "precision-recall": pr_plot(pr, (metrics["recall"], metrics["precision"])),
                 "score histogram": hist_png}
        splits = [{"split": str(k), "images": int(len(g)), "products": int(g["product_id"].nunique())}
                  for k, g in df.groupby("split", sort=True)]
        qa = build_report(ReportInputs(
            kind="evaluate", line=params.evaluate.line, params=params, model_dir=Path(model_dir), data_manifest=src,
            thr_info=thr_info, scored=scored, verdicts=verdicts, metrics=metrics, amaps=amaps, boxes=boxes,
            plots=plots, videos=videos, notes=notes, splits=splits, previous=previous_run(out_dir),
            history_file=history_path(params, out_dir), gradient_model=Path(model_dir) if gradient else None),
            out.tmp, pdf=params.evaluate.pdf)
        del amaps
        files.update({n: out.tmp / n for n in ("report.html", "qa.json") + (("report.pdf",) if params.evaluate.pdf else ())})
        if qa["families"] and qa["families"]["ari"] is not None:
            report.notes.append(f"defect families: k = {qa['families']['k']}, adjusted Rand index "
                                f"{qa['families']['ari']:.3f} against the true defect types")
        report.read += [str(src), str(model_dir), str(threshold_path)]
        report.wrote += [str(Path(out_dir) / n) for n in files]
        report.wrote += [str(Path(out_dir) / "videos" / v.name) for v in videos]
        report.n_in, report.n_out = len(df), len(scored)
        auroc = metrics["image_auroc"]
        report.notes.append(f"{len(scored)} test images, {len(verdicts)} products "
                            f"({metrics['n_products_flagged']} flagged); image AUROC "
                            f"{'n/a' if auroc is None else f'{auroc:.4f}'}, accuracy {metrics['accuracy']}")
        if metrics["pixel_auroc"] is not None:
            report.notes.append(f"pixel AUROC {metrics['pixel_auroc']:.4f}; {metrics.get('n_boxes', 0)} boxes on "
                                f"{metrics.get('n_flagged_images_with_box', 0)} flagged images")
        report.notes.extend(metrics["notes"])
    return report


def history_path(params: Params, out_dir: Path) -> Path:
    """``evaluate.history``; a relative one is taken from the folder holding ``out_dir``."""
    p = Path(params.evaluate.history)
    return p if p.is_absolute() else Path(out_dir).parent / p


def _auroc_of(scores, labels) -> float | None:
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    known = np.isin(lab, ["good", "defect"]) & np.isfinite(s)
    return _auroc(lab[known] == "defect", s[known])


def pixel_metric(scored: pd.DataFrame, amaps: np.ndarray) -> tuple[float | None, str | None]:
    """Pixel AUROC over the test rows with a known label where a ground-truth mask exists for some
    defective row (good rows count as all-zero masks); (None, why) otherwise. Defective rows without
    a mask are left out (their defect pixels are unknown)."""
    from defectflow.anomaly_maps import load_mask, pixel_auroc

    if "gt_mask_path" not in scored.columns:
        return None, "pixel_auroc is null: no ground-truth masks (gt_mask_path)"
    paths = scored["gt_mask_path"].to_numpy(dtype=object)
    lab = scored["label"].to_numpy(dtype=object)
    has = np.array([isinstance(p, str) and bool(p) for p in paths])
    if not has.any():
        return None, "pixel_auroc is null: no test image has a ground-truth mask"
    use = (lab == "good") | ((lab == "defect") & has)
    size = amaps.shape[1:]
    masks = [load_mask(p, size) if h else None for p, h in zip(paths[use], has[use])]
    value = pixel_auroc([amaps[i] for i in np.flatnonzero(use)], masks)       # views: no copy of the maps
    note = None
    if (~has & (lab == "defect")).any():
        note = f"pixel_auroc leaves out {int((~has & (lab == 'defect')).sum())} defective test image(s) without a mask"
    return value, note


def _image_wh(path: str, default: tuple[int, int]) -> tuple[int, int]:
    from defectflow.fsutil import ImageReadError, read_image
    import cv2
    try:
        img = read_image(path, cv2.IMREAD_UNCHANGED)
    except ImageReadError:
        return default
    return int(img.shape[1]), int(img.shape[0])


def flagged_boxes(scored: pd.DataFrame, amaps: np.ndarray, map_thr: float, params: Params) -> pd.DataFrame:
    """Boxes of every flagged test image (``pred_defect``) at the map threshold, in the image's pixels."""
    from defectflow.anomaly_maps import boxes_from_map

    rows = []
    mp = params.maps
    for i, rec in enumerate(scored.to_dict("records")):
        if not rec.get("pred_defect"):
            continue
        wh = _image_wh(rec["image_path"], (amaps.shape[2], amaps.shape[1]))
        for rank, b in enumerate(boxes_from_map(amaps[i], map_thr, min_area=mp.min_area, confidence=mp.confidence,
                                                image_size=wh)):
            rows.append({"item_id": rec["item_id"], "product_id": rec["product_id"], "camera": rec["camera"],
                         "image_path": rec["image_path"], "label": rec["label"], "defect_type": rec.get("defect_type"),
                         "score": rec["score"], "rank": rank, **b.to_dict()})
    return pd.DataFrame(rows)[list(BOX_COLUMNS)] if rows else empty_boxes()


def empty_boxes() -> pd.DataFrame:
    """A boxes table (``BOX_COLUMNS``) with no rows."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in BOX_COLUMNS.items()})
