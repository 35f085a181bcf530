"""The report of a score run (new, unlabeled footage): the same page and qa.json as evaluate's, without
the label-based parts, written atomically into ``OUT/report/``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from defectflow import layout
from defectflow.config import Params
from defectflow.reporting.build import ReportInputs, build_report
from defectflow.stage import StageReport, logger, stage_run

log = logger("score")


def score_and_report(params: Params, rows: pd.DataFrame, model_dir: Path, thr_info: dict, data_manifest: Path,
                     out_dir: Path, history_file: Path | None = layout.HISTORY_FILE
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict, StageReport]:
    """Score every view of ``rows`` (ROI rows of all frames; the ``is_center`` ones are scored), judge
    the products, annotate the videos and write the report: (scored, verdicts, qa, report)."""
    from defectflow.annotate import annotate_videos
    from defectflow.evaluate import flagged_boxes, histogram_table
    from defectflow.reporting.plots import hist_plot
    from defectflow.scoring import product_verdicts, score_with_maps

    threshold = float(thr_info["threshold"])
    centre = rows[rows["is_center"].astype(bool)].reset_index(drop=True)
    centre["synthetic"] = False
    conv_info = thr_info.get("conv")
    map_thr = float(conv_info["map_threshold"]) if conv_info else None
    with stage_run("score-report", out_dir) as (out, report):
        scored, amaps = score_with_maps(centre, model_dir, params, progress=True, keep_maps=True, map_threshold=map_thr)
        scored["pred_defect"] = scored["score"] >= threshold
        verdicts = product_verdicts(scored, threshold)
        boxes = flagged_boxes(scored, amaps, map_thr, params) if amaps is not None and map_thr is not None else None
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
