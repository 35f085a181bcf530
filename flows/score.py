"""Score new videos or images with the current model: per-product verdicts, no retraining.

    python -m flows.server -- python -m flows.score --source PATH --kind videos|images [--out DIR]

Runs frames -> detect -> masks -> roi on the new input (into ``OUT/work``), scores
every product view with the registry's champion (``models/model`` and ``models/threshold.json``
with a warning while the registry has none), and writes
``OUT/scores.parquet`` and ``OUT/verdicts.parquet`` (defective if any camera flags it).
Input is streamed through frames..roi in chunks (videos: whole runs, ``scale.score_chunk`` videos; images:
``scale.score_chunk`` x ``scale.unit_images`` images; into ``OUT/work/chunk-NNNN`` when there is more than
one), so decoded frames never pile up with the input; the per-item stages map their units through the task
runner ``scale`` names (threads or Dask). The centre views of every chunk are then scored in parts of
``scale.unit_images`` views, one task each through the same runner (the same scores whatever the runner),
into one report
``OUT/report/report.html`` + ``report.pdf`` (evaluate's without the label-based parts) and the Prefect
artifacts ``score-<line>-summary``, ``-metrics``, ``-flagged``. The parts return scores and the flagged
views' boxes, no anomaly maps (the report draws the few it shows again), so memory does not grow with the views.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.server import quiet_environment

quiet_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import pandas as pd  # noqa: E402

from defectflow import detect, frames, layout, masks, roi  # noqa: E402
from defectflow.registry.store import champion_or_default  # noqa: E402
from defectflow.evaluate import read_threshold  # noqa: E402
from defectflow.config import load_params, params_from_dict  # noqa: E402
from defectflow.manifest import ROI, SCORES, VERDICTS, read_manifest, write_manifest  # noqa: E402
from defectflow.stage import manifest_path  # noqa: E402
from defectflow.units.chunks import image_chunks, row_parts, run_chunks  # noqa: E402
from tasks.common import transient_io  # noqa: E402
from tasks.units import mapper_for, task_runner  # noqa: E402


@task(name="score-part", cache_policy=NO_CACHE, retry_delay_seconds=2, retry_condition_fn=transient_io)
def score_part_task(params: dict, rows: pd.DataFrame, model_dir: str, map_threshold: float | None, threshold: float):
    """Score one part of the centre views (``score_run.score_part``): (scored rows, the flagged views' boxes)."""
    from defectflow.reporting.score_run import score_part

    return score_part(params_from_dict(params, "score params"), rows, model_dir, map_threshold, threshold)


def _mapped_scorer(base: dict, params, model_dir: str, timing: dict):
    """Score the centre views in parts of ``scale.unit_images`` rows, one task each through the flow's runner."""
    from defectflow.reporting.score_run import merge_scored

    def scorer(centre: pd.DataFrame, map_threshold: float | None, threshold: float):
        t0 = time.perf_counter()
        parts = row_parts(centre, params.scale.unit_images) or [centre]
        futures = [score_part_task.with_options(task_run_name=f"score:{k}", retries=params.scale.retries)
                   .submit(base, part, model_dir, map_threshold, threshold) for k, part in enumerate(parts)]
        merged = merge_scored([f.result() for f in futures])
        timing.update(score_s=round(time.perf_counter() - t0, 2), score_parts=len(parts))
        return merged
    return scorer


def _score(base: dict, params, roi_dirs: list[str], model_dir: str, threshold_file: str, out_dir: str) -> dict:
    """Score the centre view of every product/camera of the chunks' roi outputs (mapped in parts), decide per
    product, write one report, publish artifacts."""
    from defectflow.reporting.score_run import score_and_report
    from tasks.artifacts import publish_run

    srcs = [manifest_path(d) for d in roi_dirs]
    df = pd.concat([read_manifest(s, ROI) for s in srcs], ignore_index=True)
    thr_info = read_threshold(Path(threshold_file))
    out, timing = Path(out_dir), {}
    scored, verdicts, qa, _ = score_and_report(params, df, Path(model_dir), thr_info, srcs[0], out / "report",
                                               scorer=_mapped_scorer(base, params, model_dir, timing))
    write_manifest(scored[[c for c in scored.columns if c in SCORES.names]], SCORES, out / "scores.parquet")
    write_manifest(verdicts, VERDICTS, out / "verdicts.parquet", meta={"threshold": float(thr_info["threshold"])})
    keys = publish_run(qa, None)
    n_bad = int((verdicts.verdict == "defect").sum())
    get_run_logger().info("scored %d views of %d products (%d part(s) in %.1f s): %d defective -> %s; report %s; "
                          "artifacts %s", len(scored), len(verdicts), timing["score_parts"], timing["score_s"], n_bad,
                          out / "verdicts.parquet", out / "report/report.html", ", ".join(keys))
    return {"views": len(scored), "products": len(verdicts), "defective": n_bad,
            "report": str(out / "report" / "report.html"), "artifacts": keys, **timing}


def _chunk(params, source: str, part: dict, work: Path) -> dict[str, str]:
    """frames..roi of one chunk (``part``: frames.run's ``runs`` or ``rows``; empty: all of it) into ``work``."""
    dirs = {s: str(work / s) for s in ("frames", "detect", "masks", "roi")}
    mapper = mapper_for(params.scale)
    frames.run(params, Path(source), Path(dirs["frames"]), mapper=mapper, **part)
    detect.run(params, Path(dirs["frames"]), Path(dirs["detect"]), mapper=mapper)
    masks.run(params, Path(dirs["detect"]), Path(dirs["masks"]), mapper=mapper)
    roi.run(params, Path(dirs["masks"]), Path(dirs["roi"]), mapper=mapper)
    return dirs


def chunk_parts(params, source: str, kind: str) -> list[dict]:
    """The streamed chunks: whole runs of ``scale.score_chunk`` videos, or ``scale.score_chunk`` units of
    ``scale.unit_images`` images (frames.run keyword arguments)."""
    sp = params.scale
    if kind != "images":
        return [{"runs": runs} for runs in run_chunks(source, sp.score_chunk)]
    from defectflow.sources.images import load_items
    return [{"rows": rows} for rows in image_chunks(len(load_items(params)), sp.score_chunk * sp.unit_images)]


@flow(name="score", log_prints=True)
def score(source: str, kind: str = "videos", out: str = "data/score",
          params_path: str = "params.yaml") -> dict:
    """New videos or images -> per-product verdicts with the current model, streamed in chunks."""
    base = load_params(params_path).model_dump(mode="json")
    base["source"].update(kind=kind, path=source)
    params = params_from_dict(base, "score params")
    work = Path(out) / "work"
    chunks = chunk_parts(params, source, kind)
    model_dir, threshold_file = champion_or_default(
        params, layout.STAGE_DIRS["train"], layout.THRESHOLD_FILE, get_run_logger())
    model, threshold = str(model_dir), str(threshold_file)
    if len(chunks) == 1:
        return {**_score(base, params, [_chunk(params, source, {}, work)["roi"]], model, threshold, out), "chunks": 1}
    roi_dirs = []
    for k, part in enumerate(chunks):
        get_run_logger().info("chunk %d/%d: %s", k + 1, len(chunks),
                              ", ".join(part["runs"]) if "runs" in part else "images %d..%d" % part["rows"])
        roi_dirs.append(_chunk(params, source, part, work / f"chunk-{k:04d}")["roi"])
    return {**_score(base, params, roi_dirs, model, threshold, out), "chunks": len(roi_dirs)}


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
