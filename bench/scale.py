"""Per-item throughput through Prefect, threads vs a 2-worker Dask LocalCluster: frames+detect crops/s and
the score flow's images/s; peak RSS of frames..roi and of the score flow at 1x and 10x the demo's videos
(issue 14). Prints one JSON line.

    python bench/scale.py [--size small|tiny] [--workdir DIR] [--skip-stages] [--score-20x]

The score flow needs a model: the bench trains a small one first in its scratch project (frames..threshold
with ``SMALL_TRAIN``; ``evaluate.video`` off, so the score flow's report annotates no videos), then runs
``python -m flows.score`` on the demo (parts of ``SCORE_PART`` views). Its images/s = centre views scored /
the seconds of the scoring map (from submitting the parts to the last one back: workers loading the model
included), from the flow's JSON. ``--skip-stages``: only the score flow (no frames+detect, no frames..roi).

Each measurement is ``python -m flows.stage ...`` in a scratch project copy on one local Prefect
server; images/s = detect crops / the stages' own seconds (from their log lines), and also over
the command's wall time (Prefect start-up and the cluster's workers included). Peak RSS is the
largest process of the command (``getrusage`` of a fresh parent: the flow process or a Dask worker).
The 10x input lists the demo's videos 10 times under new run names.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectflow.scratch import copy_project  # noqa: E402
from defectflow.sources import demo  # noqa: E402
from flows.server import prefect_server  # noqa: E402

STAGE_SECONDS = re.compile(r"defectflow\.(\w+) - \w+: read .* in ([0-9.]+)s")
# runs the command and prints the peak RSS (KiB) of its process tree's largest process, fresh each time
PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
        "sys.exit(rc)")


def repeat_source(src: Path, dst: Path, times: int) -> Path:
    """``src``'s videos listed ``times`` times under new run names (symbolic links, not copies)."""
    (dst / "videos").mkdir(parents=True, exist_ok=True)
    videos, passes = pd.read_csv(src / "videos.csv"), pd.read_csv(src / "passes.csv")
    vs, ps = [], []
    for k in range(times):
        v, p = videos.copy(), passes.copy()
        v["run"], p["run"] = v["run"] + f"-x{k}", p["run"] + f"-x{k}"
        p["product_id"] = p["product_id"] + f"-x{k}"
        names = []
        for x in videos["video"]:
            link = dst / "videos" / f"x{k}_{Path(x).name}"
            if not link.exists():
                link.symlink_to((src / x).resolve())
            names.append(f"videos/{link.name}")
        v["video"] = names
        vs.append(v)
        ps.append(p)
    pd.concat(vs).to_csv(dst / "videos.csv", index=False)
    pd.concat(ps).to_csv(dst / "passes.csv", index=False)
    return dst


SMALL_TRAIN = {"train.epochs": 6, "train.n_transforms": 1, "train.n_transforms_test": 1, "train.hidden": 64,
               "train.n_coupling_blocks": 2, "evaluate.video": False}
SCORE_PART = 16     # scale.unit_images for the score flow: the tiny demo's ~56 centre views in 4 parts


def _set_params(proj: Path, scale: dict, source: Path) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["scale"].update(scale)
    params["source"].update(kind="videos", path=str(source))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _peak_run(args: list[str], proj: Path, env: dict) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``args`` under the peak-RSS wrapper: (the process, wall seconds, peak RSS in KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=proj, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, wall, int(re.search(r"PEAK_RSS_KB=(\d+)", proc.stderr).group(1))


def train_model(proj: Path, env: dict, source: Path) -> float:
    """frames..threshold on ``source`` in ``proj`` (models/model, models/threshold.json); seconds."""
    _set_params(proj, {"unit_cache": False, "workers": 2, "runner": "threads"}, source)
    _, wall, _ = _peak_run([sys.executable, "-m", "flows.stage", "frames", "detect", "masks", "roi", "augment",
                            "synth", "train", "threshold"], proj, env)
    shutil.rmtree(proj / "data", ignore_errors=True)
    return round(wall, 1)


def measure_score(proj: Path, env: dict, scale: dict, source: Path, out: str) -> dict:
    """The score flow on ``source``: views, images/s of the scoring map, wall, peak RSS."""
    _set_params(proj, scale, source)
    shutil.rmtree(proj / out, ignore_errors=True)
    proc, wall, peak = _peak_run([sys.executable, "-m", "flows.score", "--source", str(source), "--kind", "videos",
                                  "--out", out], proj, env)
    result = json.loads(next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")))
    shutil.rmtree(proj / out / "work", ignore_errors=True)
    return {"views": result["views"], "chunks": result["chunks"], "score_parts": result["score_parts"],
            "score_s": result["score_s"], "images_per_s": round(result["views"] / result["score_s"], 1),
            "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 1024)}


def same_scores(proj: Path, a: str, b: str) -> bool:
    """The two score runs' scores.parquet are equal, once each run's own folder is cut out of the paths."""
    def load(out: str) -> pd.DataFrame:
        df = pd.read_parquet(proj / out / "scores.parquet")
        for c in df.columns:
            if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]):
                df[c] = df[c].map(lambda v: v.replace(f"{out}/", "OUT/") if isinstance(v, str) else v)
        return df
    return load(a).equals(load(b))


def measure(proj: Path, env: dict, stages: list[str], scale: dict, source: Path) -> dict:
    _set_params(proj, scale, source)
    shutil.rmtree(proj / "data", ignore_errors=True)
    proc, wall, peak = _peak_run([sys.executable, "-m", "flows.stage", *stages], proj, env)
    seconds = {m.group(1): float(m.group(2)) for m in STAGE_SECONDS.finditer(proc.stdout + proc.stderr)}
    crops = len(pd.read_parquet(proj / "data/detect/manifest.parquet"))
    return {"images": crops, "wall_s": round(wall, 1), "stage_s": seconds,
            "images_per_s": round(crops / sum(seconds[s] for s in ("frames", "detect")), 1),
            "images_per_s_wall": round(crops / wall, 1),
            "peak_rss_mb": round(peak / 1024)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-stages", action="store_true", help="only the score flow measurements")
    ap.add_argument("--score-20x", action="store_true",
                    help="also the score flow's peak RSS at 20x (memory flat once the report's caps are full)")
    args = ap.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="df-scale-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "demo"
    if not (src / "videos.csv").exists():
        demo.generate(src, size=args.size, seed=0)
    proj = copy_project(root / "proj", SMALL_TRAIN)
    env = {**os.environ, "PYTHONPATH": str(proj), "DEFECTFLOW_CACHE": str(root / "cache"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    off = {"unit_cache": False, "workers": 2}
    per_stage = ["frames", "detect", "masks", "roi"]
    x10_src = repeat_source(src, root / "demo_x10", 10)
    out = {"bench": "scale", "demo": args.size, "videos": len(pd.read_csv(src / "videos.csv"))}
    with prefect_server(home=root / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        if not args.skip_stages:
            threads = measure(proj, env, ["frames", "detect"], {**off, "runner": "threads"}, src)
            dask = measure(proj, env, ["frames", "detect"], {**off, "runner": "dask"}, src)
            x1 = measure(proj, env, per_stage, {**off, "runner": "threads"}, src)
            x10 = measure(proj, env, per_stage, {**off, "runner": "threads"}, x10_src)
            out.update({"frames_detect_threads": threads, "frames_detect_dask2": dask,
                        "dask_over_threads": round(dask["images_per_s"] / threads["images_per_s"], 2),
                        "rss_1x_mb": x1["peak_rss_mb"], "rss_10x_mb": x10["peak_rss_mb"],
                        "frames_to_roi_1x": x1, "frames_to_roi_10x": x10})
        out["train_s"] = train_model(proj, env, src)
        sc = {**off, "unit_images": SCORE_PART}
        s_threads = measure_score(proj, env, {**sc, "runner": "threads"}, src, "data/score-threads")
        s_dask = measure_score(proj, env, {**sc, "runner": "dask"}, src, "data/score-dask")
        same = same_scores(proj, "data/score-threads", "data/score-dask")
        s_x10 = measure_score(proj, env, {**sc, "runner": "threads"}, x10_src, "data/score-x10")
        if args.score_20x:
            s_x20 = measure_score(proj, env, {**sc, "runner": "threads"}, repeat_source(src, root / "demo_x20", 20),
                                  "data/score-x20")
            out.update({"score_rss_20x_mb": s_x20["peak_rss_mb"], "score_20x": s_x20})
    out.update({"score_threads": s_threads, "score_dask2": s_dask, "score_same_scores": same,
                "score_dask_over_threads": round(s_dask["images_per_s"] / s_threads["images_per_s"], 2),
                "score_rss_1x_mb": s_threads["peak_rss_mb"], "score_rss_10x_mb": s_x10["peak_rss_mb"],
                "score_10x": s_x10})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
