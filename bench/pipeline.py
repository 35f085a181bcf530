"""Run the whole DAG in a scratch copy of the project and print one JSON line of figures.

    python bench/pipeline.py                                   # the demo (params.yaml as it is)
    python bench/pipeline.py --set source.kind=images --set source.path=../shared/datasets/mvtec/bottle

Prints: wall time of the first `dvc repro`, of a second one with nothing changed (and whether
any stage reran), per-stage seconds, image_auroc and the test scoring rate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectflow.config import parse_sets  # noqa: E402
from defectflow.scratch import copy_project  # noqa: E402
from flows.server import prefect_server  # noqa: E402


def _timed(cmd, cwd, env) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("--keep", help="run in this folder instead of a temp one")
    args = ap.parse_args()
    overrides = parse_sets(args.set)
    if isinstance(overrides.get("source.path"), str):
        overrides["source.path"] = str(Path(overrides["source.path"]).resolve())
    work = Path(args.keep or tempfile.mkdtemp(prefix="defectflow-bench-"))
    proj = copy_project(work, overrides)
    src = yaml.safe_load((proj / "params.yaml").read_text())["source"]
    if src["kind"] == "demo":
        src_path = Path(src["path"])
        real = Path(__file__).resolve().parents[1] / src_path
        if real.is_dir() and not (proj / src_path).exists():  # reuse the workspace's demo videos
            (proj / src_path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(real, proj / src_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(proj)}
    _timed(["dvc", "init", "--no-scm", "-q", "-f"], proj, env)
    if src["kind"] == "demo":
        _timed([sys.executable, "-m", "defectflow.cli", "demo"], proj, env)
    with prefect_server(home=work / ".prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        first_s, out = _timed(["dvc", "repro"], proj, env)
        noop_s, noop_out = _timed(["dvc", "repro"], proj, env)
    stage_s = {m.group(1): float(m.group(2)) for m in
               re.finditer(r"(\w+): read .*? in ([\d.]+)s", out)}
    metrics = json.loads((proj / "reports/metrics.json").read_text())
    n_test = metrics.get("n_test")
    print(json.dumps({
        "source": src["kind"], "path": src["path"],
        "repro_s": round(first_s, 1), "noop_repro_s": round(noop_s, 2),
        "noop_reran_stages": "Running stage" in noop_out,
        "stage_s": stage_s, "image_auroc": metrics.get("image_auroc"), "score_from": metrics.get("score_from"),
        "image_auroc_by_head": {h: v["image_auroc"] for h, v in (metrics.get("heads") or {}).items()},
        "pixel_auroc": metrics.get("pixel_auroc"),
        "accuracy": metrics.get("accuracy"), "f1": metrics.get("f1"), "n_test": n_test,
        "test_scoring_images_per_s": round(n_test / stage_s["evaluate"], 1)
        if n_test and stage_s.get("evaluate") else None,
        "workdir": str(work),
    }))


if __name__ == "__main__":
    main()
