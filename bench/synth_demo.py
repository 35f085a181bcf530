"""The synth stage on the demo: its time at the params.yaml defaults, and the ablation (image AUROC without /
with the synthetic normals in the train split), through the library stages in a work folder.

    python bench/synth_demo.py --work /tmp/synth_demo [--set synth.minutes=5] [--size small]

Prints one JSON line: synth_s (the stage at the given params), kid figures, auroc_without, auroc_with.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from defectflow import augment, detect, evaluate, frames, masks, roi, synth, threshold, train  # noqa: E402
from defectflow.config import load_params_with, parse_sets  # noqa: E402
from defectflow.manifest import SYNTH, read_manifest, write_manifest  # noqa: E402
from defectflow.sources import demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work folder; reuses its demo/ .. augment/")
    ap.add_argument("--size", default=None, choices=["tiny", "small"], help="demo size (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)                                  # manifests hold paths relative to the project root
    over = {**parse_sets(args.set), "source.kind": "demo", "source.path": "demo"}
    if args.size:
        over["source.demo_size"] = args.size
    p = load_params_with(ROOT / "params.yaml", over)
    if not Path("demo/videos.csv").exists():
        demo.generate(Path("demo"), size=p.source.demo_size, seed=p.seed)
    if not Path("augment/manifest.parquet").exists():
        frames.run(p, Path("demo"), Path("frames"))
        detect.run(p, Path("frames"), Path("detect"))
        masks.run(p, Path("detect"), Path("masks"))
        roi.run(p, Path("masks"), Path("roi"))
        augment.run(p, Path("roi"), Path("augment"))
    with_p = load_params_with(ROOT / "params.yaml", {**over, "synth.use_in_training": True})
    t0 = time.perf_counter()
    synth.run(with_p, Path("augment"), Path("synth_with"))
    row = {"synth_s": round(time.perf_counter() - t0, 1), "demo_size": p.source.demo_size,
           "synth": {k: v for k, v in json.loads(Path("synth_with/quality.json").read_text()).items() if k != "net"}}
    if not args.no_ablation:
        df = read_manifest("synth_with/manifest.parquet", SYNTH)
        write_manifest(df[~df.synthetic], SYNTH, Path("synth_without/manifest.parquet"))
        for name in ("without", "with"):
            src = Path(f"synth_{name}")
            train.run(p, src, Path(f"model_{name}"))
            threshold.run(p, src, Path(f"model_{name}"), Path(f"threshold_{name}.json"), Path(f"val_{name}.parquet"))
            evaluate.run(p, src, Path(f"model_{name}"), Path(f"threshold_{name}.json"), Path(f"reports_{name}"))
            row[f"auroc_{name}"] = json.loads(Path(f"reports_{name}/metrics.json").read_text())["image_auroc"]
        row["n_synth_in_train"] = int(df.synthetic.sum())
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
