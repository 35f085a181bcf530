"""Pixel-level anomaly maps of the convolutional density model on one MVTec-layout category; one JSON line.

    python bench/pixel.py --data ../shared/datasets/mvtec/bottle

Train on train/good minus the held-out validation share (``source.val_fraction``, seeded: the
same split as bench/auroc.py), epoch picked per level by good-validation NLL only; score test/*.
The backbone runs once per image (ONNX Runtime) and its maps are cached in memory; the density
model trains on the cached maps.

Figures: image_auroc (image score = max of the blurred map), image_auroc_topk (mean of the top 1 %
of pixels), pixel_auroc (over every pixel of every test image at image_size, good images as
all-zero masks; masks resized by area), train_s (backbone maps of train + val, then fit),
score_images_per_s (preloaded image_size tensors: backbone + density + maps + image score),
density_images_per_s (the density model + maps alone), model_mb (the saved density model),
density_onnx_images_per_s (the density model in ONNX Runtime, checked against torch within 1e-4),
peak_rss_mb; box figures at the box threshold from good validation maps only (``--box-fpr``): box_recall (defective test images with a box touching the truth mask),
good_with_box (good test images with any box). Saves ``bench/out/pixel_<category>.png``
(8 test images: heat map over the image, green boxes with confidence, truth outline in white).
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

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defectflow.anomaly_maps import (MapExtractor, anomaly_maps, boxes_from_map, contact_sheet,  # noqa: E402
                                     draw_boxes, image_scores, level_stats, load_mask,
                                     load_rgb, overlay, pixel_auroc)
from defectflow.config import load_params_with, parse_sets  # noqa: E402
from defectflow.density.conv import save_conv_flow  # noqa: E402
from defectflow.density.conv_fit import ConvFitConfig, fit_conv_flow  # noqa: E402
from defectflow.sources.images import load_items  # noqa: E402


def _onnx_density_rate(model, maps, threads: int) -> float:
    """Images/s of the density model exported to ONNX and run by ONNX Runtime (maps only)."""
    import onnxruntime as ort

    from defectflow.density.conv import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "conv.onnx", [m.shape[2:] for m in maps])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = lambda i: {f"map{k}": np.ascontiguousarray(m[i:i + 16]) for k, m in enumerate(maps)}  # noqa: E731
    sess.run(None, feeds(0))
    t = time.perf_counter()
    got = [sess.run(None, feeds(i)) for i in range(0, len(maps[0]), 16)]
    rate = len(maps[0]) / (time.perf_counter() - t)
    want = model.log_likelihood_maps(maps)
    for k, w in enumerate(want):
        g = np.concatenate([p[k] for p in got])
        err = float(np.abs(g - w.numpy()).max() / max(1.0, float(w.abs().max())))
        if err > 1e-4:
            raise SystemExit(f"ONNX density differs from torch: {err}")
    return round(rate, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an MVTec-AD category folder (train/good, test/<type>)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="param override (source/seed/train)")
    ap.add_argument("--levels", default="0,1", help="backbone feature levels (0 = stride 8, 1 = 16, 2 = 32)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--hidden-ratio", type=float, default=1.0)
    ap.add_argument("--kernels", default="3,1")
    ap.add_argument("--clamp", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sigma", type=float, default=4.0, help="Gaussian blur of the maps, px at image_size")
    ap.add_argument("--norm", choices=["none", "val"], default="none",
                    help="standardise each level by good-validation stats before averaging")
    ap.add_argument("--box-fpr", type=float, default=0.05,
                    help="box threshold = the 1 - fpr quantile of good-validation image scores (max of map): "
                         "the same rule as the image threshold's fallback, so a flagged image has a box")
    ap.add_argument("--min-area", type=float, default=0.001, help="smallest box region, fraction of the map")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    params = load_params_with(args.params, {"source.kind": "images", "source.path": str(Path(args.data)),
                                             **parse_sets(args.set)})
    tp = params.train
    torch.set_num_threads(tp.threads)
    size = tp.image_size
    levels = tuple(int(v) for v in args.levels.split(","))

    items = load_items(params)
    rows = {s: items[items["split"] == s] for s in ("train", "val", "test")}
    fx = MapExtractor(tp.backbone, image_size=size, levels=levels, pretrained=tp.pretrained, weights=tp.weights,
                      threads=tp.threads)

    t0 = time.perf_counter()
    train_maps = fx.extract(rows["train"]["image_path"].tolist(), progress=args.verbose)
    val_maps = fx.extract(rows["val"]["image_path"].tolist(), progress=args.verbose)
    maps_s = time.perf_counter() - t0
    cfg = ConvFitConfig(n_blocks=args.blocks, hidden_ratio=args.hidden_ratio,
                        kernels=tuple(int(k) for k in args.kernels.split(",")), clamp=args.clamp,
                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=params.seed,
                        threads=tp.threads)
    fit = fit_conv_flow(train_maps, val_maps, cfg, progress=args.verbose)
    model = fit.model
    train_s = time.perf_counter() - t0

    val_nll = model.nll_per_dim_maps(val_maps)
    norm = level_stats(val_nll) if args.norm == "val" else None
    val_amaps = anomaly_maps(val_nll, (size, size), args.sigma, norm)
    pix_thr = float(np.quantile(image_scores(val_amaps, "max"), 1.0 - args.box_fpr))

    # scoring on preloaded tensors (decode excluded): backbone + density + maps + score
    test = rows["test"]
    images = [load_rgb(p, size) for p in test["image_path"]]
    x = fx.prepare(images)
    _ = image_scores(anomaly_maps(model.nll_per_dim_maps(fx.run(x[:4])), (size, size), args.sigma, norm))   # warm-up
    t1 = time.perf_counter()
    test_maps = fx.run(x)
    t2 = time.perf_counter()
    amaps = anomaly_maps(model.nll_per_dim_maps(test_maps), (size, size), args.sigma, norm)
    scores = image_scores(amaps, "max")
    t3 = time.perf_counter()
    ort_rate = _onnx_density_rate(model, test_maps, tp.threads)

    from sklearn.metrics import roc_auc_score
    y = (test["label"] == "defect").to_numpy()
    masks = [load_mask(m, (size, size)) if isinstance(m, str) else None for m in test["gt_mask_path"]]
    has_masks = any(m is not None for m in masks)
    per_type = {}
    for t in sorted(test.loc[y, "defect_type"].unique()):
        sel = ~y | (test["defect_type"] == t).to_numpy()
        per_type[str(t)] = round(float(roc_auc_score(y[sel], scores[sel])), 4)

    boxes = [boxes_from_map(a, pix_thr, min_area=args.min_area) for a in amaps]
    hit = [any(m is not None and m[b.y0:b.y1, b.x0:b.x1].any() for b in bx) for bx, m in zip(boxes, masks)]
    box_recall = float(np.mean([h for h, d in zip(hit, y) if d])) if y.any() else None
    good_with_box = float(np.mean([len(b) > 0 for b, d in zip(boxes, y) if not d])) if (~y).any() else None

    with tempfile.TemporaryDirectory() as tmp:
        model_mb = save_conv_flow(Path(tmp) / "conv.pt", model).stat().st_size / 2**20

    # contact sheet: 2 per defect type (highest score first) + the 2 highest-scoring good images
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / ".gitignore").exists():
        (out_dir / ".gitignore").write_text("*\n")
    order = []
    types = [t for t in sorted(test["defect_type"].dropna().unique())]
    per = max(1, (8 - 2) // max(1, len(types)))
    for t in types:
        idx = np.flatnonzero((test["defect_type"] == t).to_numpy())
        order += list(idx[np.argsort(-scores[idx])][:per])
    good_idx = np.flatnonzero(~y)
    order += list(good_idx[np.argsort(-scores[good_idx])][:8 - len(order)])
    vmin = float(np.median(val_amaps))
    vmax = vmin + 3.0 * max(pix_thr - vmin, 1e-6)       # the box threshold sits at 1/3 of the colour scale
    tiles, caps = [], []
    for i in order[:8]:
        tile = draw_boxes(overlay(images[i], amaps[i], vmin, vmax), boxes[i])
        if masks[i] is not None:
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(tile, contours, -1, (255, 255, 255), 1)
        tiles.append(tile)
        caps.append(f"{test['defect_type'].iloc[i] if y[i] else 'good'} s={scores[i]:.3g}")
    sheet_path = out_dir / f"pixel_{Path(args.data).name}.png"
    cv2.imwrite(str(sheet_path), contact_sheet(tiles, cols=4, captions=caps))

    out = {
        "data": str(args.data), "backbone": tp.backbone, "image_size": size, "levels": list(levels),
        "strides": fx.strides, "n_blocks": cfg.n_blocks, "hidden_ratio": cfg.hidden_ratio, "kernels": list(cfg.kernels),
        "epochs": cfg.epochs, "best_epoch": fit.best_epoch, "lr": cfg.lr, "sigma": args.sigma, "norm": args.norm,
        "image_auroc": round(float(roc_auc_score(y, scores)), 4) if 0 < y.sum() < len(y) else None,
        "image_auroc_topk": (round(float(roc_auc_score(y, image_scores(amaps, "topk"))), 4)
                             if 0 < y.sum() < len(y) else None),
        "per_defect_type": per_type,
        "pixel_auroc": round(pixel_auroc(amaps, masks), 4) if has_masks else None,
        "box_recall": box_recall, "good_with_box": good_with_box, "box_threshold": round(pix_thr, 4),
        "n_train": len(rows["train"]), "n_val": len(rows["val"]), "n_test": len(test),
        "train_s": round(train_s, 1), "maps_s": round(maps_s, 1), "fit_s": round(fit.seconds, 1),
        "score_images_per_s": round(len(test) / (t3 - t1), 2),
        "density_images_per_s": round(len(test) / (t3 - t2), 2),
        "density_onnx_images_per_s": ort_rate,
        "model_mb": round(model_mb, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "contact_sheet": str(sheet_path),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
