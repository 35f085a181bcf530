"""Per-item throughput of frames+detect through Prefect: threads vs a 2-worker Dask LocalCluster,
and the peak RSS of frames..roi at 1x and 10x the demo's videos (issue 14). Prints one JSON line.

    python bench/scale.py [--size small|tiny] [--workdir DIR]

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


def measure(proj: Path, env: dict, stages: list[str], scale: dict, source: Path) -> dict:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["scale"].update(scale)
    params["source"].update(kind="videos", path=str(source))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(proj / "data", ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "flows.stage", *stages], cwd=proj,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{stages} failed:\n{proc.stderr[-3000:]}")
    peak = int(re.search(r"PEAK_RSS_KB=(\d+)", proc.stderr).group(1))
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
    args = ap.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="df-scale-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "demo"
    if not (src / "videos.csv").exists():
        demo.generate(src, size=args.size, seed=0)
    proj = copy_project(root / "proj", {})
    env = {**os.environ, "PYTHONPATH": str(proj), "DEFECTFLOW_CACHE": str(root / "cache"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    off = {"unit_cache": False, "workers": 2}
    per_stage = ["frames", "detect", "masks", "roi"]
    with prefect_server(home=root / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        threads = measure(proj, env, ["frames", "detect"], {**off, "runner": "threads"}, src)
        dask = measure(proj, env, ["frames", "detect"], {**off, "runner": "dask"}, src)
        x1 = measure(proj, env, per_stage, {**off, "runner": "threads"}, src)
        x10 = measure(proj, env, per_stage, {**off, "runner": "threads"}, repeat_source(src, root / "demo_x10", 10))
    print(json.dumps({"bench": "scale", "demo": args.size, "videos": len(pd.read_csv(src / "videos.csv")),
                      "frames_detect_threads": threads, "frames_detect_dask2": dask,
                      "dask_over_threads": round(dask["images_per_s"] / threads["images_per_s"], 2),
                      "rss_1x_mb": x1["peak_rss_mb"], "rss_10x_mb": x10["peak_rss_mb"],
                      "frames_to_roi_1x": x1, "frames_to_roi_10x": x10}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
