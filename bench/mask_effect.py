"""Effect of the background removal on image AUROC (seed 000, Tables I-II), one JSON line per variant.

    python bench/mask_effect.py                                 # small demo, params.yaml, 3 variants
    python bench/mask_effect.py --work /tmp/vis --set train.epochs=5
    python bench/mask_effect.py --transforms both               # with and without augment, like the tables

Variants (``masks.method``): ``original`` = none (the detect crops as they are), ``crop`` = cut
``masks.shrink`` (10%) off each side, ``mask`` = composite foreground mask shrunk by 10% and
padded back. The library stages run in-process (no DVC, no Prefect) in ``<work>``: frames and
detect once (reused when ``<work>/detect`` exists, e.g. after ``bench/vision.py --work``), then
per variant masks -> roi -> augment -> synth -> train -> threshold -> evaluate. Each line:
variant, transforms (augment on/off), image_auroc, accuracy, f1, threshold, n_test, seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defectflow import augment, detect, evaluate, frames, masks, roi, synth, threshold, train  # noqa: E402
from defectflow.config import load_params_with, parse_sets  # noqa: E402
from defectflow.sources import demo  # noqa: E402

VARIANTS = {"original": "none", "crop": "crop", "mask": "mask"}


def _params(overrides: dict):
    return load_params_with(ROOT / "params.yaml", overrides)


def run_variant(work: Path, variant: str, transforms: bool, overrides: dict) -> dict:
    p = _params({**overrides, "masks.method": VARIANTS[variant], "augment.enabled": transforms})
    out = work / f"{variant}_{'aug' if transforms else 'noaug'}"
    t0 = time.perf_counter()
    masks.run(p, work / "detect", out / "masks")
    roi.run(p, out / "masks", out / "roi")
    augment.run(p, out / "roi", out / "augment")
    synth.run(p, out / "augment", out / "synth")
    train.run(p, out / "synth", out / "model")
    threshold.run(p, out / "synth", out / "model", out / "threshold.json", out / "val_scores.parquet")
    evaluate.run(p, out / "synth", out / "model", out / "threshold.json", out / "reports")
    m = json.loads((out / "reports" / "metrics.json").read_text())
    thr = json.loads((out / "threshold.json").read_text())
    return {"variant": variant, "masks.method": VARIANTS[variant], "transforms": transforms,
            "image_auroc": m.get("image_auroc"), "accuracy": m.get("accuracy"), "f1": m.get("f1"),
            "threshold": thr.get("threshold"), "n_test": m.get("n_test"),
            "product_accuracy": m.get("product_accuracy"), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="work folder (default: a temp folder); reuses <work>/demo and <work>/detect")
    ap.add_argument("--size", default="small", choices=["tiny", "small"], help="demo size")
    ap.add_argument("--variants", default="original,crop,mask")
    ap.add_argument("--transforms", default="params", choices=["params", "on", "off", "both"],
                    help="augment on/off (params: as params.yaml says)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    work = Path(args.work or tempfile.mkdtemp(prefix="mask_effect_"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = parse_sets(args.set)
    overrides.update({"source.kind": "demo", "source.path": str(work / "demo"), "source.demo_size": args.size})
    p = _params(overrides)
    if not (work / "demo" / "videos.csv").exists():
        demo.generate(work / "demo", size=args.size, seed=p.seed)
    if not (work / "detect" / "manifest.parquet").exists():
        frames.run(p, work / "demo", work / "frames")
        detect.run(p, work / "frames", work / "detect")
    aug = {"params": [p.augment.enabled], "on": [True], "off": [False], "both": [False, True]}[args.transforms]
    for transforms in aug:
        for variant in args.variants.split(","):
            print(json.dumps(run_variant(work, variant, transforms, overrides)), flush=True)


if __name__ == "__main__":
    main()
