"""Image AUROC and speed of the model stages on one MVTec-AD-layout category; prints one JSON line.

    python bench/auroc.py --data ../shared/datasets/mvtec/bottle [--table] [--set train.hidden=256]

Runs the library stages directly (no DVC, no Prefect) at params.yaml defaults: train on
train/good minus a held-out validation share (``source.val_fraction``, seeded; half of it picks
the epoch, the other half calibrates the threshold), threshold (fallback quantile: MVTec has no
defective validation images), evaluate on test/*. The feature cache starts empty (``--work``/cache),
so ``train_s`` includes the backbone.

Figures (all speeds from this one run, same machine load; absolute numbers on a shared 2-core box
are noisy, ratios much less so):

- ``score_images_per_s``: every head of the model (params defaults: image + conv head, fused score)
  on preloaded 224 px float images: rotations / normalisation, the backbone (one pass per image and
  ``n_transforms_test`` rotation, shared by the heads), both density heads (ONNX Runtime), the
  anomaly maps (upsampling, blur) and their scores; ``image_head_images_per_s``: the image head alone
- ``backbone_images_per_s``: the ONNX Runtime backbone alone on the same preloaded tensors, one
  pass per image (batch 32) -- the issue's anchor; ``backbone_same_work_images_per_s``: the
  backbone alone on every transformed input the scorer needs (the scorer's ceiling)
- ``torch_backbone_images_per_s``: torch eager on the same 224 px tensors (batch 32)
- ``e2e_images_per_s``: from the image files (read + decode + resize included, no feature cache),
  ``decode_share``: decode time / end-to-end time
- ``peak_rss_mb``, ``model_mb`` (density.onnx, the head), ``model_pt_mb``, ``backbone_mb``
- ``--table``: images/s against n_transforms_test 1, 4, 16, 64 (preloaded tensors)
- ``pixel_auroc``: from the conv head's anomaly maps (``train.head`` conv / both) where the folder
  has ``ground_truth/`` masks, else null; ``image_auroc_by_head``: the image AUROC of each head
  trained (``image_auroc`` is the ``train.score_from`` head's); ``conv_*``: the conv head's fit
  seconds, size and boxes at the map threshold. The speed figures are the image head's (they need it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from defectflow.config import load_params_with, parse_sets  # noqa: E402
from defectflow.scoring import HEAD_FILE, MODEL_FILE, load_heads, select_rows  # noqa: E402
from suite import model_size, run_model_stages  # noqa: E402


def _rate(n: int, fn, repeat: int = 1) -> float:
    fn_best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        fn_best = min(fn_best, time.perf_counter() - t)
    return n / fn_best


def _rates(n: int, fns: dict, repeat: int = 5) -> dict:
    """Images/s of each function, best of ``repeat`` rounds that run every function once in turn:
    a slow spell of the shared box then hits every figure of a ratio, not just one."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: n / b for name, b in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an MVTec-AD category folder (train/good, test/<type>)")
    ap.add_argument("--params", default="params.yaml", help="base parameters (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("--work", help="keep outputs here (default: a temp folder)")
    ap.add_argument("--table", action="store_true", help="also images/s for n_transforms_test 1, 4, 16, 64")
    ap.add_argument("--speed-images", type=int, default=128, help="test images used for the speed figures")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    params = load_params_with(args.params, {"source.kind": "images", "source.path": str(Path(args.data)),
                                             **parse_sets(args.set)})
    tp = params.train

    work = Path(args.work or tempfile.mkdtemp(prefix="defectflow-auroc-"))
    os.environ["DEFECTFLOW_CACHE"] = str(work / "cache")       # cold feature cache: train_s includes the backbone
    onnx_src = Path(".cache/defectflow/onnx")                  # reuse exported backbones (not features)
    if onnx_src.is_dir():
        (work / "cache").mkdir(parents=True, exist_ok=True)
        if not (work / "cache" / "onnx").exists():
            os.symlink(onnx_src.resolve(), work / "cache" / "onnx")
    items, train_s = run_model_stages(params, work)
    tp = tp.model_copy(update={"image_size": model_size(work / "model")})     # train.image_size auto: resolved
    params = params.model_copy(update={"train": tp})

    # ---------------------------------------------------------------- speed, one run
    import onnxruntime  # noqa: F401
    import torch
    from defectflow.features import _resize, backbone_graph, decode_image, prepare, read_bytes

    test = select_rows(items, "test")
    paths = test["image_path"].tolist()[: args.speed_images]
    n = len(paths)
    heads = load_heads(work / "model")
    model = heads.image
    fx = model.extractor(params)
    model.score_features(np.zeros((1, tp.n_transforms_test, fx.dim), np.float32), tp.threads)  # warm up

    def decode_all():
        with ThreadPoolExecutor(max_workers=tp.threads) as pool:
            return list(pool.map(lambda p: _resize(decode_image(read_bytes(p), p)[0], tp.image_size), paths))

    t = time.perf_counter()
    images = decode_all()
    decode_s = time.perf_counter() - t

    def image_head(imgs, t_count):
        return model.score_features(fx.features(imgs, t_count), tp.threads)

    def score(imgs, t_count):
        p = params.model_copy(update={"train": tp.model_copy(update={"n_transforms_test": t_count})})
        return heads.score_images(imgs, p)[0]["score"]

    score(images[:4], tp.n_transforms_test)                       # warm up the sessions
    x224 = prepare(images, 1, tp.image_size, (1.0,))[0]
    net224 = fx.nets[0]
    inputs = prepare(images, tp.n_transforms_test, tp.image_size, tp.scales)
    rates = _rates(n, {"score": lambda: score(images, tp.n_transforms_test),
                       "image": lambda: image_head(images, tp.n_transforms_test),
                       "backbone": lambda: [net224.pooled(x224[i:i + 32]) for i in range(0, n, 32)],
                       "backbone_same": lambda: fx.features_of_inputs(inputs)})
    score_rate, image_rate, bb_rate, bb_same_rate = (rates[k] for k in ("score", "image", "backbone", "backbone_same"))
    torch.set_num_threads(tp.threads)
    tnet = backbone_graph(tp.backbone, tp.image_size, pretrained=tp.pretrained, weights=tp.weights,
                          input_norm=tp.input_norm)                                  # the exported graph
    xt = torch.from_numpy(x224)
    with torch.no_grad():
        tnet(xt[:2])
        torch_rate = _rate(n, lambda: [tnet(xt[i:i + 32]) for i in range(0, n, 32)])
    from defectflow.scoring import score_with_maps
    t = time.perf_counter()
    e2e = score_with_maps(test.iloc[:n], work / "model", params, model=heads)[0]
    e2e_s = time.perf_counter() - t
    a = np.asarray(score(images[:8], tp.n_transforms_test))
    b = e2e["score"].to_numpy()[:8]
    table = None
    if args.table:
        sub = images[: min(32, n)]
        table = {str(k): round(_rate(len(sub), lambda k=k: score(sub, k)), 2) for k in (1, 4, 16, 64)}

    m = json.loads((work / "reports" / "metrics.json").read_text())
    thr = json.loads((work / "threshold.json").read_text())
    card = json.loads((work / "model" / "card.json").read_text())
    out = {
        "data": str(args.data), "backbone": tp.backbone, "scales": list(tp.scales),
        "n_transforms_test": tp.n_transforms_test,
        "image_auroc": m["image_auroc"], "image_auroc_ci": m["image_auroc_ci"], "pixel_auroc": m.get("pixel_auroc"),
        "score_from": m.get("score_from"),
        "image_auroc_by_head": {h: v["image_auroc"] for h, v in (m.get("heads") or {}).items()},
        "accuracy": m["accuracy"], "f1": m["f1"], "precision": m["precision"], "recall": m["recall"],
        "test_fpr": m["fpr"], "val_fpr": thr["val"]["fpr"],
        "threshold_method": thr["method_used"], "bands": {"low": thr["bands"]["low"], "high": thr["bands"]["high"]},
        "per_defect_type": {k: v["auroc"] for k, v in m["per_defect_type"].items()},
        "n_train": card["n_train_images"], "n_val_select": card["n_val_select"],
        "n_val_calibrate": card["n_val_calibrate"], "n_test": m["n_test"],
        "best_epoch": card["best_epoch"], "epochs_run": card["epochs_run"],
        "train_s": round(train_s, 1), "feature_s": card["feature_seconds"], "fit_s": card["fit_seconds"],
        "speed_images": n,
        "heads": list(heads.names),
        "score_images_per_s": round(score_rate, 2),
        "image_head_images_per_s": round(image_rate, 2),
        "backbone_images_per_s": round(bb_rate, 2),
        "backbone_same_work_images_per_s": round(bb_same_rate, 2),
        "torch_backbone_images_per_s": round(torch_rate, 2),
        "score_vs_backbone": round(score_rate / bb_rate, 3),
        "score_vs_backbone_same_work": round(score_rate / bb_same_rate, 3),
        "backbone_ort_vs_torch": round(bb_rate / torch_rate, 2),
        "e2e_images_per_s": round(n / e2e_s, 2),
        "decode_share": round(decode_s / e2e_s, 3),
        "preloaded_vs_files_max_rel_diff": float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))),
        "n_transforms_table": table,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_mb": round((work / "model" / HEAD_FILE).stat().st_size / 2**20, 2),
        "model_pt_mb": round((work / "model" / MODEL_FILE).stat().st_size / 2**20, 2),
        "backbone_mb": round(sum(net.path.stat().st_size for net in fx.nets) / 2**20, 2),
        "conv_fit_s": (card.get("conv") or {}).get("fit_seconds"),
        "conv_map_s": (card.get("conv") or {}).get("map_seconds"),
        "conv_best_epoch": (card.get("conv") or {}).get("best_epoch"),
        "conv_model_mb": (card.get("conv") or {}).get("model_mb"),
        "map_threshold": m.get("map_threshold"), "n_boxes": m.get("n_boxes"),
        "n_flagged_images_with_box": m.get("n_flagged_images_with_box"),
        "work": str(work),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
