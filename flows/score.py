"""Score new videos or images with the current model: per-product verdicts, no retraining.

    python -m flows.server -- python -m flows.score --source PATH --kind videos|images [--out DIR]

Runs frames -> detect -> masks -> roi on the new input (into ``OUT/work``), scores
every product view with the registry's champion (``models/model`` and ``models/threshold.json``
with a warning while the registry has none), and writes
``OUT/scores.parquet`` and ``OUT/verdicts.parquet`` (defective if any camera flags it).
Video input is streamed through frames..roi in chunks of whole runs (``scale.score_chunk`` videos,
into ``OUT/work/chunk-NNNN`` when there is more than one), so decoded frames never pile up with the
number of videos; the per-item stages map their units through the task runner ``scale`` names
(threads or Dask). The centre views of every chunk are then scored together, into one report
``OUT/report/report.html`` + ``report.pdf`` (evaluate's without the label-based parts) and the Prefect
artifacts ``score-<line>-summary``, ``-metrics``, ``-flagged`` (the report holds the views' maps: its
memory grows with the views scored, about 30 kB a view on the map grid).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.server import quiet_environment

quiet_environment()

from prefect import flow, get_run_logger, task  # noqa: E402

import pandas as pd  # noqa: E402

from defectflow import detect, frames, layout, masks, roi  # noqa: E402
from defectflow.registry.store import champion_or_default  # noqa: E402
from defectflow.evaluate import read_threshold  # noqa: E402
from defectflow.config import load_params, params_from_dict  # noqa: E402
from defectflow.manifest import ROI, SCORES, VERDICTS, read_manifest, write_manifest  # noqa: E402
from defectflow.stage import manifest_path  # noqa: E402
from defectflow.units.chunks import run_chunks  # noqa: E402
from tasks.units import mapper_for, task_runner  # noqa: E402


@task(name="score-items")
def score_task(params: dict, roi_dirs: list[str], model_dir: str, threshold_file: str, out_dir: str) -> dict:
    """Score the centre view of every product/camera of the chunks' roi outputs, decide per product, write
    one report, publish artifacts."""
    from defectflow.reporting.score_run import score_and_report
    from tasks.artifacts import publish_run

    srcs = [manifest_path(d) for d in roi_dirs]
    df = pd.concat([read_manifest(s, ROI) for s in srcs], ignore_index=True)
    src = srcs[0]
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


def _chunk(params, source: str, runs: list[str] | None, work: Path) -> dict[str, str]:
    """frames..roi of one chunk (``runs`` of the source; None: all of it) into ``work``."""
    dirs = {s: str(work / s) for s in ("frames", "detect", "masks", "roi")}
    mapper = mapper_for(params.scale)
    frames.run(params, Path(source), Path(dirs["frames"]), mapper=mapper, runs=runs)
    detect.run(params, Path(dirs["frames"]), Path(dirs["detect"]), mapper=mapper)
    masks.run(params, Path(dirs["detect"]), Path(dirs["masks"]), mapper=mapper)
    roi.run(params, Path(dirs["masks"]), Path(dirs["roi"]), mapper=mapper)
    return dirs


@flow(name="score", log_prints=True)
def score(source: str, kind: str = "videos", out: str = "data/score",
          params_path: str = "params.yaml") -> dict:
    """New videos or images -> per-product verdicts with the current model, streamed in chunks."""
    base = load_params(params_path).model_dump(mode="json")
    base["source"].update(kind=kind, path=source)
    params = params_from_dict(base, "score params")
    work = Path(out) / "work"
    chunks = run_chunks(source, params.scale.score_chunk) if kind != "images" else [None]
    model_dir, threshold_file = champion_or_default(
        params, layout.STAGE_DIRS["train"], layout.THRESHOLD_FILE, get_run_logger())
    model, threshold = str(model_dir), str(threshold_file)
    if len(chunks) == 1:
        return score_task(base, [_chunk(params, source, None, work)["roi"]], model, threshold, out)
    roi_dirs = []
    for k, runs in enumerate(chunks):
        get_run_logger().info("chunk %d/%d: runs %s", k + 1, len(chunks), ", ".join(runs))
        roi_dirs.append(_chunk(params, source, runs, work / f"chunk-{k:04d}")["roi"])
    return {**score_task(base, roi_dirs, model, threshold, out), "chunks": len(roi_dirs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="videos folder (videos.csv) or images folder")
    ap.add_argument("--kind", choices=["videos", "images", "demo"], default="videos")
    ap.add_argument("--out", default="data/score")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    runner = task_runner(load_params(args.params).scale)
    result = score.with_options(task_runner=runner)(args.source, args.kind, args.out, args.params)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
