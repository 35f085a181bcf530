"""Assemble the report: ``report.html`` (self-contained but for the videos beside it), ``report.pdf``
(the same page; videos as a frame and a caption) and ``qa.json`` (counts, families, model card), and
append the run to the history that draws the trend.

>>> qa = build_report(ReportInputs(kind="evaluate", ...), out.tmp)       # doctest: +SKIP
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from defectflow.reporting import families as fam
from defectflow.reporting import gallery
from defectflow.reporting.overlays import encode_thumb, flagged_ids, product_tiles, thumbnail
from defectflow.reporting.page import CSS, TEMPLATE
from defectflow.reporting.plots import scatter_plot, trend_plot
from defectflow.reporting.summary import append_history, history_entry, qa_summary
from defectflow.stage import logger

log = logger("report")
METRIC_KEYS = ("score_from", "image_auroc", "image_auroc_ci", "pixel_auroc", "map_threshold", "n_boxes", "accuracy",
               "precision", "recall", "f1", "fpr", "n_test", "n_good", "n_defect", "n_unknown", "tp", "fp", "tn", "fn",
               "product_accuracy", "n_products")
GALLERY_N = 12
EXAMPLES_PER_FAMILY = 6


@dataclass
class ReportInputs:
    """What a report is made of; ``metrics`` None = an unlabeled score run (no label-based parts)."""
    kind: str                                  # evaluate | score
    line: str
    params: object                             # Params
    model_dir: Path
    data_manifest: Path
    thr_info: dict
    scored: pd.DataFrame
    verdicts: pd.DataFrame
    metrics: dict | None = None
    amaps: np.ndarray | dict | None = None       # aligned with scored, or item_id -> map of the shown views
    boxes: pd.DataFrame | None = None
    plots: dict = field(default_factory=dict)  # title -> PNG bytes
    videos: list = field(default_factory=list)  # annotated video files, in out_dir/videos
    notes: list = field(default_factory=list)
    splits: list = field(default_factory=list)  # [{split, images, products}]
    previous: dict | None = None               # gallery.previous_run
    history_file: Path | None = None
    gradient_model: Path | None = None


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode() if png else None


def false_alarm_rows(fa: dict) -> list[dict]:
    def ci(r):
        return f"{r['ci95'][0]:.3g} - {r['ci95'][1]:.3g}" if r.get("ci95") else ""
    rows = [{"name": "target (threshold.target_fpr)", "rate": fmt(fa.get("target")), "n": "", "ci": ""}]
    if fa.get("expected") is not None:
        rng = fa.get("promised_range95")
        rows.append({"name": "promised by the conformal threshold", "rate": fmt(fa["expected"]), "n": "",
                     "ci": f"{rng[0]:.3g} - {rng[1]:.3g} (over calibration draws)" if rng else ""})
    rows.append({"name": "validation (calibration images)", "rate": fmt(fa["val"]["rate"]), "n": fa["val"]["n"],
                 "ci": ci(fa["val"])})
    rows.append({"name": "test", "rate": fmt(fa["test"]["rate"]), "n": fa["test"]["n"], "ci": ci(fa["test"])})
    return rows


def band_rows(bands: dict | None) -> list[dict]:
    if not bands:
        return []
    lo, hi = bands["low"], bands["high"]
    return [{"name": "good", "tag": "good", "range": f"< {lo:.4g}"},
            {"name": "review", "tag": "review", "range": f"{lo:.4g} to {hi:.4g}"},
            {"name": "bad", "tag": "defect", "range": f">= {hi:.4g}"}]


def family_section(inp: ReportInputs, labelled: bool) -> tuple[dict | None, str]:
    """Families of the flagged images (one per flagged product and camera), against the passed ones."""
    s = inp.scored
    flagged = s[s["pred_defect"].astype(bool)].reset_index(drop=True)
    if len(flagged) < fam.MIN_ITEMS:
        return None, f"Too few flagged images to group ({len(flagged)}; at least {fam.MIN_ITEMS})."
    t0 = time.perf_counter()
    n_flagged, sampled = len(flagged), len(flagged) > fam.MAX_ITEMS
    if sampled:
        flagged = flagged.sample(fam.MAX_ITEMS, random_state=inp.params.seed).sort_index().reset_index(drop=True)
    passed = s[~s["pred_defect"].astype(bool)]
    passed = passed.sample(min(len(passed), 200), random_state=inp.params.seed)
    got = fam.item_features(flagged["image_path"], passed["image_path"], inp.model_dir, inp.params)
    if got is None:
        return None, ("No defect families: they need the image head's backbone settings (train.head: image or both) "
                      "and readable passed images.")
    f_flag, keep = got
    flagged = flagged[keep].reset_index(drop=True)
    result = fam.cluster_families(f_flag, None, seed=inp.params.seed)
    if result is None:
        return None, "Too few readable flagged images to group."
    types = flagged["defect_type"] if "defect_type" in flagged else pd.Series([None] * len(flagged))
    true_defects = (flagged["label"] == "defect").to_numpy() & types.notna().to_numpy() if labelled else None
    ari = (fam.adjusted_rand(types[true_defects], result.labels[true_defects])
           if true_defects is not None and true_defects.sum() >= 2 else None)
    clusters = []
    for k in range(result.k):
        idx = np.flatnonzero(result.labels == k)
        sub = flagged.iloc[idx].sort_values("score", ascending=False)
        counts = sub["defect_type"].fillna("(none)").value_counts().to_dict() if labelled and "defect_type" in sub else {}
        clusters.append({"id": k + 1, "n": int(len(idx)), "types": ", ".join(f"{t} {n}" for t, n in counts.items()),
                         "examples": [e for e in (thumbnail(p, 90) for p in sub["image_path"].head(EXAMPLES_PER_FAMILY))
                                      if e]})
    log.info("defect families: %d flagged images, k = %d, in %.1f s", len(flagged), result.k, time.perf_counter() - t0)
    rule = fam.__doc__.split("Rule: ")[1].split("\n\n")[0].replace("\n", " ")
    if sampled:
        rule += f" Grouped: a seeded sample of {fam.MAX_ITEMS} of the {n_flagged} flagged images."
    return {"rule": rule, "k": result.k,
            "silhouettes": result.silhouettes, "ari": ari, "n": int(len(flagged)), "clusters": clusters,
            "members": [{"item_id": str(i), "family": int(c) + 1} for i, c in zip(flagged["item_id"], result.labels)],
            "scatter": _b64(scatter_plot(result.xy, result.labels, "flagged images, t-SNE of their region features"))}, ""


def _policy(thr_info: dict) -> list[tuple[str, str]]:
    rows = [("threshold", fmt(thr_info.get("threshold"))), ("method", fmt(thr_info.get("method_used"))),
            ("target false-alarm rate", fmt(thr_info.get("target_fpr"))), ("score from", fmt(thr_info.get("score_from")))]
    if thr_info.get("note"):
        rows.append(("note", thr_info["note"]))
    return rows


def build_report(inp: ReportInputs, tmp_dir: Path, *, pdf: bool = True) -> dict:
    """Write ``report.html``, ``report.pdf`` and ``qa.json`` into ``tmp_dir`` (a stage's temp folder) and
    append the run to ``inp.history_file``; returns qa.json's content."""
    from jinja2 import Environment, select_autoescape

    from defectflow.annotate import poster_frame
    from defectflow.reporting.card import model_card

    tmp_dir = Path(tmp_dir)
    m = inp.metrics
    labelled = m is not None
    bands = inp.thr_info.get("bands")
    qa = qa_summary(inp.verdicts, inp.scored, float(inp.thr_info["threshold"]), bands["low"] if bands else None)
    card = model_card(inp.data_manifest, inp.model_dir, inp.params.model_dump(mode="json"), inp.thr_info)
    prev_hist = []
    entry = history_entry(inp.kind, qa, model_version=card["model_version"], metrics=m)
    if inp.history_file is not None:
        history = append_history(inp.history_file, {**entry, "line": inp.line})
        prev_hist = [h for h in history[:-1] if h.get("line", inp.line) == inp.line]
    else:
        history = [entry]
    trend = [h for h in history if h.get("line", inp.line) == inp.line]
    tiles, overlay_title = product_tiles(inp.scored, inp.verdicts, inp.amaps, inp.boxes if inp.boxes is not None
                                         else pd.DataFrame(columns=["item_id"]), inp.thr_info.get("conv"), inp.params,
                                         inp.gradient_model)
    vrec = inp.verdicts.set_index(inp.verdicts["product_id"].astype(str))
    products = [{**vrec.loc[pid].to_dict(), "product_id": pid, "tiles": tiles[pid]} for pid in tiles]
    families, families_note = family_section(inp, labelled)
    videos = []
    for v in inp.videos:
        frame = poster_frame(Path(v))
        videos.append({"name": Path(v).name, "src": f"videos/{Path(v).name}",
                       "poster": encode_thumb(frame, 360) if frame is not None else None})
    compare = gallery.comparison(inp.previous, m, inp.verdicts, card["model_version"]) if labelled else None
    shown = flagged_ids(inp.verdicts, inp.params.evaluate.max_report_images)
    fa = (m or {}).get("false_alarms")
    metric_rows = [(k, fmt(m.get(k))) for k in METRIC_KEYS if k in m] if labelled else []
    if labelled:
        metric_rows += [(f"image_auroc ({h} head)", fmt(v.get("image_auroc"))) for h, v in (m.get("heads") or {}).items()]
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    html = env.from_string(TEMPLATE).render(
        css=CSS, kind=inp.kind, line=inp.line, generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), qa=qa,
        card=card, pct=lambda r: "n/a" if r is None else f"{100 * r:.1f}%", fmt=fmt,
        prev_rate=prev_hist[-1].get("defect_rate") if prev_hist else None, trend_png=_b64(trend_plot(trend)),
        products=products, has_labels=labelled, overlay_title=overlay_title, videos=videos,
        notes=list(inp.notes) + list((m or {}).get("notes") or []), metrics=m, bands=(m or {}).get("bands"),
        band_rows=band_rows((m or {}).get("bands")) if labelled else [], fa=fa,
        fa_rows=false_alarm_rows(fa) if fa else [], metric_rows=metric_rows,
        confusion={k: m[k] for k in ("tp", "fp", "tn", "fn")} if labelled else None,
        per_type=[{"name": k, "n": v["n"], "auroc": fmt(v["auroc"])} for k, v in ((m or {}).get("per_defect_type") or {}).items()],
        splits=inp.splits, plots=[(k, _b64(v)) for k, v in inp.plots.items() if v],
        false_alarms=gallery.false_alarms(inp.scored, GALLERY_N) if labelled else [],
        missed=gallery.missed_defects(inp.scored, GALLERY_N) if labelled else [],
        masks=gallery.composite_masks(inp.scored, shown, GALLERY_N), compare=compare,
        families=families, families_note=families_note, policy=_policy(inp.thr_info))
    (tmp_dir / "report.html").write_text(html, encoding="utf-8")
    if pdf:
        write_pdf(html, tmp_dir / "report.pdf", tmp_dir)
    out = {**qa, "kind": inp.kind, "line": inp.line, "card": card, "history_entry": entry,
           "flagged_products": [{k: p[k] for k in ("product_id", "run", "max_score", "flagged_cameras", "label")}
                                for p in products],
           "families": None if families is None else {k: families[k] for k in ("k", "silhouettes", "ari", "n", "members")},
           "compare": None if compare is None else {k: compare[k] for k in ("previous_model", "model", "rows")}}
    (tmp_dir / "qa.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


def write_pdf(html: str, path: Path, base: Path) -> Path:
    """The page printed by WeasyPrint (print media: videos become their poster frame)."""
    import logging

    from weasyprint import HTML

    t0 = time.perf_counter()
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    HTML(string=html, base_url=str(base)).write_pdf(str(path))
    log.info("report.pdf written in %.1f s (%d kB)", time.perf_counter() - t0, path.stat().st_size // 1024)
    return path
