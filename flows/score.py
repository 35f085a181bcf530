"""Score new videos or images with the current model: per-product verdicts, no retraining.

    python -m flows.server -- python -m flows.score --source PATH --kind videos|images [--out DIR]

Runs frames -> detect -> masks -> roi on the new input (into ``OUT/work``), scores
every product view with ``models/model`` and ``models/threshold.json``, and writes
``OUT/scores.parquet`` and ``OUT/verdicts.parquet`` (defective if any camera flags it), the
report ``OUT/report/report.html`` + ``report.pdf`` (evaluate's without the label-based parts)
and the Prefect artifacts ``score-<line>-summary``, ``-metrics``, ``-flagged``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.server import quiet_environment

quiet_environment()

from prefect import flow, get_run_logger, task  # noqa: E402

from defectflow import layout  # noqa: E402
from defectflow.evaluate import read_threshold  # noqa: E402
from defectflow.config import load_params, params_from_dict  # noqa: E402
from defectflow.manifest import ROI, SCORES, VERDICTS, read_manifest, write_manifest  # noqa: E402
from defectflow.stage import manifest_path  # noqa: E402
from tasks.detect import detect_task  # noqa: E402
from tasks.frames import frames_task  # noqa: E402
from tasks.masks import masks_task  # noqa: E402
from tasks.roi import roi_task  # noqa: E402


@task(name="score-items")
def score_task(params: dict, roi_dir: str, model_dir: str, threshold_file: str, out_dir: str) -> dict:
    """Score the centre view of every product/camera, decide per product, write the report, publish artifacts."""
    from defectflow.reporting.score_run import score_and_report
    from tasks.artifacts import publish_run

    src = manifest_path(roi_dir)
    df = read_manifest(src, ROI)
    thr_info = read_threshold(Path(threshold_file))
    p = params_from_dict(params, "score params")
    out = Path(out_dir)
    scored, verdicts, qa, _ = score_and_report(p, df, Path(model_dir), thr_info, src, out / "report")
    write_manifest(scored[[c for c in scored.columns if c in SCORES.names]], SCORES, out / "scores.parquet")
    write_manifest(verdicts, VERDICTS, out / "verdicts.parquet", meta={"threshold": float(thr_info["threshold"])})
    keys = publish_run(qa, None)
    n_bad = int((verdicts.verdict == "defect").sum())
    get_run_logger().info("scored %d views of %d products: %d defective -> %s; report %s; artifacts %s",
                          len(scored), len(verdicts), n_bad, out / "verdicts.parquet", out / "report/report.html",
                          ", ".join(keys))
    return {"views": len(scored), "products": len(verdicts), "defective": n_bad,
            "report": str(out / "report" / "report.html"), "artifacts": keys}


@flow(name="score", log_prints=True)
def score(source: str, kind: str = "videos", out: str = "data/score",
          params_path: str = "params.yaml") -> dict:
    """New videos or images -> per-product verdicts with the current model."""
    base = load_params(params_path).model_dump(mode="json")
    base["source"].update(kind=kind, path=source)
    work = Path(out) / "work"
    dirs = {s: str(work / s) for s in ("frames", "detect", "masks", "roi")}
    frames_task(base, source, dirs["frames"])
    detect_task(base, dirs["frames"], dirs["detect"])
    masks_task(base, dirs["detect"], dirs["masks"])
    roi_task(base, dirs["masks"], dirs["roi"])
    return score_task(base, dirs["roi"], str(layout.STAGE_DIRS["train"]), str(layout.THRESHOLD_FILE), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="videos folder (videos.csv) or images folder")
    ap.add_argument("--kind", choices=["videos", "images", "demo"], default="videos")
    ap.add_argument("--out", default="data/score")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    result = score(args.source, args.kind, args.out, args.params)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
