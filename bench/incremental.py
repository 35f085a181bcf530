"""Cost of a rerun after adding ~10% new videos, with the unit and feature caches (issue 13).

    python bench/incremental.py [--size small] [--new 3] [--workdir DIR]

On the demo (``--size``): (1) frames..roi + backbone features of every roi image on all videos but
``--new`` of them (fills the caches, untimed), (2) the same on all videos (``incremental_s``),
(3) all videos again with empty unit and feature caches (``full_s``). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectflow import detect, frames, masks, roi  # noqa: E402
from defectflow.config import Params  # noqa: E402
from defectflow.features import FeatureExtractor  # noqa: E402
from defectflow.image_io import auto_image_size  # noqa: E402
from defectflow.sources import demo  # noqa: E402

STAGES = (("frames", frames), ("detect", detect), ("masks", masks), ("roi", roi))


def run_all(params: Params, src: Path, work: Path) -> dict:
    """frames..roi, then features of every roi image; seconds per step and unit-cache notes."""
    out, inp = {}, src
    for name, mod in STAGES:
        t0 = time.perf_counter()
        report = mod.run(params, inp, work / name)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_units"] = next((n for n in report.notes if "unit(s)" in n), "skipped")
        inp = work / name
    paths = pd.read_parquet(work / "roi/manifest.parquet").image_path.tolist()
    t0 = time.perf_counter()
    tp = params.train
    if tp.image_size == "auto":                           # as train resolves it
        tp = tp.model_copy(update={"image_size": auto_image_size(paths)})
    FeatureExtractor.from_params(tp).extract(paths, tp.n_transforms)
    out["features_s"] = round(time.perf_counter() - t0, 2)
    out["images"] = len(paths)
    out["total_s"] = round(sum(v for k, v in out.items() if k.endswith("_s")), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--new", type=int, default=3, help="videos added for the rerun (small demo: 24 videos)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="df-incremental-")).resolve()
    cache = root / "cache"
    os.environ["DEFECTFLOW_CACHE"] = str(cache)
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    src = Path("demo")
    if not (src / "videos.csv").exists():
        demo.generate(src, size=args.size, seed=0)
    every = src / "videos_all.csv"                       # the full list, kept aside (a rerun restores it)
    if not every.exists():
        shutil.copy(src / "videos.csv", every)
    videos = pd.read_csv(every)
    params = Params.model_validate({"source": {"kind": "videos", "path": str(src)}, "scale": {"unit_cache": True}})
    videos.iloc[:-args.new].to_csv(src / "videos.csv", index=False)
    run_all(params, src, Path("work"))                                   # before: caches filled
    videos.to_csv(src / "videos.csv", index=False)
    incremental = run_all(params, src, Path("work"))
    for sub in ("units", "features"):
        shutil.rmtree(cache / sub, ignore_errors=True)
    full = run_all(params, src, Path("work"))
    print(json.dumps({"bench": "incremental", "demo": args.size, "videos": len(videos), "new_videos": args.new,
                      "full_s": full["total_s"], "incremental_s": incremental["total_s"],
                      "ratio": round(incremental["total_s"] / full["total_s"], 3),
                      "full": full, "incremental": incremental}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
