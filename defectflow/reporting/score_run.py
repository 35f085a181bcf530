"""The report of a score run (new, unlabeled footage): the same page and qa.json as evaluate's, without
the label-based parts, written atomically into ``OUT/report/``.

Scoring can be cut into parts (``score_part`` on consecutive rows, e.g. one Prefect task each) and the
parts joined (``merge_scored``) before the report: the result is the same as scoring all rows at once. The
parts keep no anomaly maps (only the flagged views' boxes); the few the report draws are computed again, so
memory does not grow with the views scored.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from defectflow import layout
from defectflow.config import Params
from defectflow.reporting.build import ReportInputs, build_report
from defectflow.stage import StageReport, logger, stage_run, trim_memory

log = logger("score")
Scored = tuple[pd.DataFrame, "pd.DataFrame | None"]     # (scored rows, boxes of the flagged views or None)
_HEADS: dict[tuple, object] = {}
_HEADS_LOCK = threading.Lock()


def centre_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The views a score run scores: the ``is_center`` rows, renumbered, marked not synthetic."""
    centre = rows[rows["is_center"].astype(bool)].reset_index(drop=True)
    centre["synthetic"] = False
    return centre


def _heads(model_dir: Path):
    """The model folder's heads, loaded once per process (and again when a file in it changes)."""
    from defectflow.scoring import load_heads

    d = Path(model_dir).resolve()
    key = (str(d), tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir() if p.is_file())))
    with _HEADS_LOCK:
        if key not in _HEADS:
            _HEADS.clear()
            _HEADS[key] = load_heads(d)
        return _HEADS[key]


def score_part(params: Params, rows: pd.DataFrame, model_dir: Path | str, map_threshold: float | None,
               threshold: float, progress: bool = False) -> Scored:
    """Score ``rows`` (index kept) with every head, mark ``pred_defect`` (score >= ``threshold``) and box the
    flagged views at ``map_threshold`` from the conv head's maps, batch by batch: the maps are not kept, so
    memory does not grow with the views. (scored rows, boxes; None without a conv head or map threshold)."""
    from defectflow.evaluate import empty_boxes, flagged_boxes
    from defectflow.scoring import score_with_maps

    heads = _heads(Path(model_dir))
    boxing = heads.conv is not None and map_threshold is not None
    boxes = []

    def box_flagged(positions, cols, maps):
        score = np.asarray(cols["score"])
        hit = score >= threshold
        if hit.any():
            sub = rows.iloc[positions[hit]].assign(score=score[hit], pred_defect=True)
            boxes.append(flagged_boxes(sub, maps[hit], map_threshold, params))

    scored, _ = score_with_maps(rows, model_dir, params, model=heads, progress=progress, map_threshold=map_threshold,
                                map_sink=box_flagged if boxing else None)
    scored["pred_defect"] = scored["score"] >= threshold
    if not boxing:
        return scored, None
    return scored, (pd.concat(boxes, ignore_index=True) if boxes else empty_boxes())


def merge_scored(parts: list[Scored]) -> Scored:
    """Parts scored by ``score_part`` (in row order) as one: rows, skipped images, boxes concatenated."""
    if not parts:
        raise ValueError("no scored parts to merge")
    scored = pd.concat([p[0] for p in parts])
    scored.attrs = {"scored_by": parts[0][0].attrs.get("scored_by"),
                    "skipped": [s for p in parts for s in p[0].attrs.get("skipped", [])]}
    boxes = None if parts[0][1] is None else pd.concat([p[1] for p in parts], ignore_index=True)
    return scored, boxes


def shown_maps(params: Params, scored: pd.DataFrame, verdicts: pd.DataFrame, model_dir: Path | str,
               map_threshold: float | None) -> dict[str, np.ndarray]:
    """item_id -> anomaly map of the views the report draws (every camera of the flagged products it shows),
    scored again: the parts keep no maps, and these are few (``evaluate.max_report_images`` products)."""
    from defectflow.reporting.overlays import camera_views, flagged_ids
    from defectflow.scoring import score_with_maps

    views = camera_views(scored, flagged_ids(verdicts, params.evaluate.max_report_images))
    rows = scored[scored["item_id"].isin([r["item_id"] for recs in views.values() for r in recs])]
    again, amaps = score_with_maps(rows, model_dir, params, model=_heads(Path(model_dir)), keep_maps=True,
                                   map_threshold=map_threshold, chunk=min(32, params.scale.unit_images))
    return {} if amaps is None else dict(zip(again["item_id"], amaps))


def score_and_report(params: Params, rows: pd.DataFrame, model_dir: Path, thr_info: dict, data_manifest: Path,
                     out_dir: Path, history_file: Path | None = layout.HISTORY_FILE,
                     scorer: Callable[[pd.DataFrame, float | None, float], Scored] | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict, StageReport]:
    """Score every view of ``rows`` (ROI rows of all frames; the ``is_center`` ones are scored), judge
    the products, annotate the videos and write the report: (scored, verdicts, qa, report).

    ``scorer(centre, map_threshold, threshold)``: how the centre views are scored (default: ``score_part`` on
    all of them; the score flow maps parts of them through its task runner)."""
    from defectflow.annotate import annotate_videos
    from defectflow.evaluate import histogram_table
    from defectflow.reporting.plots import hist_plot
    from defectflow.scoring import product_verdicts

    threshold = float(thr_info["threshold"])
    centre = centre_rows(rows)
    conv_info = thr_info.get("conv")
    map_thr = float(conv_info["map_threshold"]) if conv_info else None
    with stage_run("score-report", out_dir) as (out, report):
        if scorer is None:
            scored, boxes = score_part(params, centre, model_dir, map_thr, threshold, progress=True)
        else:
            scored, boxes = scorer(centre, map_thr, threshold)
        verdicts = product_verdicts(scored, threshold)
        amaps = shown_maps(params, scored, verdicts, model_dir, map_thr) if boxes is not None else None
        trim_memory()                                       # the scoring's freed arrays, before the report's work
        hist = histogram_table(scored["score"], scored["label"], threshold)
        videos = []
        if params.evaluate.video and "video_path" in rows:
            videos = annotate_videos(rows, scored, verdicts, threshold, out.tmp / "videos")
        qa = build_report(ReportInputs(
            kind="score", line=params.evaluate.line, params=params, model_dir=Path(model_dir),
            data_manifest=Path(data_manifest), thr_info=thr_info, scored=scored, verdicts=verdicts, amaps=amaps,
            boxes=boxes, plots={"score histogram": hist_plot(hist, threshold)}, videos=videos,
            notes=["score run on new footage: no labels, so no accuracy, ROC or false-alarm figures"],
            history_file=history_file), out.tmp, pdf=params.evaluate.pdf)
        report.read += [str(data_manifest), str(model_dir)]
        report.wrote += [str(Path(out_dir) / n) for n in ("report.html", "qa.json")]
        report.wrote += [str(Path(out_dir) / "videos" / v.name) for v in videos]
        report.n_in, report.n_out = len(centre), len(scored)
        report.notes.append(f"{len(verdicts)} products: {qa['flagged']} flagged, {qa['review']} to review")
    return scored, verdicts, qa, report
