"""Image AUROC of the model stages on one MVTec-AD category; prints one JSON line.

    python bench/auroc.py --data ../shared/datasets/mvtec/bottle
    python bench/auroc.py --data ../shared/datasets/mvtec/bottle --set train.epochs=20 --set train.hidden=256

Runs the library stages directly (no DVC, no Prefect): train on train/good minus a held-out
validation share (``source.val_fraction``, seeded), threshold on the good validation images
(fallback quantile: MVTec has no defective validation images), evaluate on test/*.

Figures: image_auroc, accuracy / f1 at the fitted threshold, train_s (train stage wall time,
features + fit), score_images_per_s (``score_items`` on the test images with a warm model:
decode + features + density), e2e_images_per_s (test images / evaluate stage wall time: model
load, scoring, verdicts, metrics, plots, report), peak_rss_mb, model_mb (model.pt) and
backbone_mb (the cached ONNX backbones used).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectflow import evaluate, threshold, train  # noqa: E402
from defectflow.config import load_params, params_from_dict  # noqa: E402
from defectflow.manifest import SYNTH, write_manifest  # noqa: E402
from defectflow.scoring import load_model, score_items, select_rows  # noqa: E402
from defectflow.sources.images import load_items  # noqa: E402


def _override(data: dict, key: str, value) -> None:
    node = data
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an MVTec-AD category folder (train/good, test/<type>)")
    ap.add_argument("--params", default="params.yaml", help="base parameters (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("--work", help="keep outputs here (default: a temp folder)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    data = load_params(args.params).model_dump(mode="json") if Path(args.params).is_file() else {}
    _override(data, "source.kind", "images")
    _override(data, "source.path", str(Path(args.data)))
    for item in args.set:
        key, _, value = item.partition("=")
        _override(data, key, yaml.safe_load(value))
    params = params_from_dict(data, "bench")

    work = Path(args.work or tempfile.mkdtemp(prefix="defectflow-auroc-"))
    items = load_items(params)
    items["is_center"] = True
    items["synthetic"] = False
    inp = work / "synth"
    write_manifest(items, SYNTH, inp / "manifest.parquet")

    t0 = time.perf_counter()
    train.run(params, inp, work / "model")
    train_s = time.perf_counter() - t0
    threshold.run(params, inp, work / "model", work / "threshold.json", work / "val_scores.parquet")
    t1 = time.perf_counter()
    evaluate.run(params, inp, work / "model", work / "threshold.json", work / "reports")
    eval_s = time.perf_counter() - t1

    test = select_rows(items, "test")
    model = load_model(work / "model")
    score_items(test.head(4), work / "model", params, model=model)           # warm up the sessions
    t2 = time.perf_counter()
    score_items(test, work / "model", params, model=model)
    score_s = time.perf_counter() - t2

    m = json.loads((work / "reports" / "metrics.json").read_text())
    thr = json.loads((work / "threshold.json").read_text())
    card = json.loads((work / "model" / "card.json").read_text())
    onnx = Path(model.extractor(params).nets[0].path).parent
    used = [net.path for net in model.extractor(params).nets]
    out = {
        "data": str(args.data), "backbone": params.train.backbone, "image_auroc": m["image_auroc"],
        "accuracy": m["accuracy"], "f1": m["f1"], "precision": m["precision"], "recall": m["recall"],
        "threshold_method": thr["method_used"], "n_train": card["n_train_images"], "n_val": card["n_val_images"],
        "n_test": m["n_test"], "best_epoch": card["best_epoch"], "epochs": params.train.epochs,
        "train_s": round(train_s, 1), "score_images_per_s": round(len(test) / score_s, 2),
        "e2e_images_per_s": round(len(test) / eval_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_mb": round((work / "model" / "model.pt").stat().st_size / 2**20, 2),
        "backbone_mb": round(sum(p.stat().st_size for p in used) / 2**20, 2),
        "onnx_cache": str(onnx), "work": str(work),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
