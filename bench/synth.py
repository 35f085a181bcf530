"""Synthetic normals on an MVTec-layout category: train the generator, measure KID, optionally the ablation.

    python bench/synth.py --data /work/shared/datasets/mvtec/bottle --size 64 --minutes 20 [--ablation]

Reals: the good train split of ``defectflow.sources.images`` (GAN training set) and its validation
split (held out: KID / FID against EMA samples). Prints one JSON line: train_s, kimg, kid_untrained,
kid_trained, kid_real_halves, ada_p_final (+ fid_*), and with ``--ablation`` image AUROC of the
params.yaml model without and with ``--n-synth`` synthetic train goods (default: as many as the real
train goods). Writes under ``--out`` (default bench/out/synth-<category>): grid.png (samples above
reals), kid.csv, kid.png (the KID curve), generator.pt.
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
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import pandas as pd  # noqa: E402

from defectflow.config import load_params_with, parse_sets  # noqa: E402
from defectflow.sources.images import load_items  # noqa: E402
from defectflow.synth.fit import fit, load_images, pick_device  # noqa: E402
from defectflow.synth.networks import NetConfig  # noqa: E402
from defectflow.synth.plots import plot_kid  # noqa: E402
from defectflow.synth.quality import FeatureModel, image_grid  # noqa: E402
from defectflow.synth.samples import image_seeds, save_samples, synthetic_rows  # noqa: E402
from defectflow.synth.trainer import TrainConfig, load_generator  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="MVTec-layout category folder")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--kimg", type=float, default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override k=v (applies to synth.* and the model)")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--n-synth", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--resume", action="store_true", help="continue --out's generator.pt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out or ROOT / "bench" / "out" / f"synth-{args.data.name}"
    out.mkdir(parents=True, exist_ok=True)
    params = load_params_with(args.params, {**parse_sets(args.set), "source.kind": "images",
                                            "source.path": str(args.data)})
    sp = params.synth
    items = load_items(params)
    goods = items[items.label == "good"]
    train_paths, val_paths = list(goods[goods.split == "train"].image_path), list(goods[goods.split == "val"].image_path)
    reals, heldout = load_images(train_paths, args.size), load_images(val_paths, args.size)
    net = NetConfig(size=args.size, channel_base=sp.channel_base, channel_max=sp.channel_max)
    cfg = TrainConfig(batch=sp.batch, lr=sp.lr, ema_kimg=sp.ema_kimg, ada_kimg=sp.ada_kimg)
    device = pick_device(sp.device)
    features = FeatureModel(threads=sp.threads)
    res = fit(reals, heldout, net, cfg, minutes=args.minutes, max_kimg=args.kimg, checkpoint=out / "generator.pt",
              seed=params.seed, device=device, resume=args.resume, features=features, threads=sp.threads)
    hist = pd.DataFrame(res.history)
    hist.to_csv(out / "kid.csv", index=False)
    plot_kid(hist, res.kid_real_halves, out / "kid.png", title=f"{args.data.name} {args.size} px")
    fakes = res.trainer.sample(32, seed=1, psi=sp.psi)
    cv2.imwrite(str(out / "grid.png"), cv2.cvtColor(image_grid(fakes, heldout[:32]), cv2.COLOR_RGB2BGR))
    row = {"data": str(args.data), "size": args.size, "device": device, "train_s": round(res.train_s, 1),
           "kimg": round(res.trainer.nimg / 1000, 2), "kid_untrained": round(res.kid_untrained, 5),
           "kid_trained": round(res.kid_trained, 5), "kid_ratio": round(res.kid_trained / res.kid_untrained, 3),
           "kid_real_halves": round(res.kid_real_halves, 5), "fid_untrained": round(res.history[0]["fid"], 2),
           "fid_trained": round(res.history[-1]["fid"], 2), "ada_p_final": round(res.trainer.ada.p, 4),
           "n_train_real": len(train_paths), "n_heldout": len(val_paths),
           "net": net.to_dict(), "batch": cfg.batch, "threads": sp.threads, "out": str(out)}
    row["wall_s"] = round(res.wall_s, 1)
    (out / "result.json").write_text(json.dumps(row))
    if args.ablation:
        row.update(ablation(params, items, out, args.n_synth or len(train_paths)))
    print(json.dumps(row), flush=True)
    return row


def ablation(params, items, out: Path, n_synth: int) -> dict:
    """Image AUROC of the params.yaml model without and with ``n_synth`` synthetic train goods."""
    from suite import run_model_stages
    g = load_generator(out / "generator.pt")
    seeds = image_seeds(params.seed, n_synth)
    paths = save_samples(g, seeds, params.synth.psi, out / "samples")
    template = items[(items.split == "train") & (items.label == "good")].iloc[0]
    extra = synthetic_rows(template, [str(p) for p in paths], seeds, params.synth.psi)
    result = {"n_synth": n_synth}
    for name, rows in (("without", None), ("with", extra)):
        t0 = time.perf_counter()
        run_model_stages(params, out / f"ablation_{name}", extra_rows=rows)
        m = json.loads((out / f"ablation_{name}" / "reports" / "metrics.json").read_text())
        result[f"auroc_{name}"] = m["image_auroc"]
        result[f"ablation_{name}_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    main()
