"""Where scoring time goes, per step, for a trained model folder; prints one JSON line.

    python bench/auroc.py --data ../shared/datasets/mvtec/bottle --work /tmp/bottle
    python bench/score_breakdown.py --work /tmp/bottle

Images/s on preloaded 224 px images (the first ``--n`` test images of the bench's manifest):
``backbone`` (ORT, one pass, prepared tensors), ``score_T1`` / ``score_T4`` (every head, as the
pipeline scores, 1 and 4 rotations) and their ratio to the backbone, and each step alone:
``prepare`` (resize / rotate into the input batch), ``conv_head`` (the conv density model in ORT
on the maps), ``maps`` (levels combined and blurred on the map grid, one map per image),
``upsample`` (grid -> image size: only when maps are kept or boxed), ``image_head`` (density.onnx),
``verify`` (the patch memory's distances at the ``maps.verify_share`` highest cells, their features included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.auroc import _rate as _best_rate, _rates  # noqa: E402


def _rate(n: int, fn) -> float:
    return round(_best_rate(n, fn, 3), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a bench/auroc.py --work folder (model/, synth/, cache/)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=96, help="test images timed")
    args = ap.parse_args()
    work = Path(args.work)
    os.environ.setdefault("DEFECTFLOW_CACHE", str(work / "cache"))
    from defectflow.anomaly_maps import combine_levels, to_image_size
    from defectflow.config import load_params_with
    from defectflow.features import _resize, load_image, prepare
    from defectflow.scoring import load_heads

    params = load_params_with(args.params, {})
    heads = load_heads(work / "model")
    df = pd.read_parquet(work / "synth" / "manifest.parquet")
    paths = df[df.split == "test"].image_path.tolist()[: args.n]
    fx = heads.image.extractor(params)
    images = [_resize(load_image(p), fx.image_size) for p in paths]
    n, net = len(images), fx.nets[0]
    x = prepare(images, 1, fx.image_size, (1.0,))[0]
    net.outputs(x[:4], ["pooled"])
    fns = {"backbone": lambda: net.outputs(x, ["pooled"], fx.batch_size)}
    for t in (1, 4):
        p = params.model_copy(update={"train": params.train.model_copy(update={"n_transforms_test": t})})
        heads.score_images(images[:4], p)
        fns[f"score_T{t}"] = lambda p=p: heads.score_images(images, p)
    out = {"images": n, **{k: round(v, 1) for k, v in _rates(n, fns).items()}}
    for t in (1, 4):
        out[f"score_T{t}_vs_backbone"] = round(out[f"score_T{t}"] / out["backbone"], 3)
    out["prepare"] = _rate(n, lambda: prepare(images, 1, fx.image_size, fx.scales))
    feats = net.outputs(x, ["pooled"], fx.batch_size)[0][:, None, :]
    out["image_head"] = _rate(n, lambda: heads.image.score_features(feats, params.train.threads))
    if heads.conv is not None:
        maps = net.outputs(x, [net.map_names[lv] for lv in heads.conv.levels], fx.batch_size)
        out["conv_head"] = _rate(n, lambda: heads.conv.nll_maps(maps, params.train.threads))
        nll = heads.conv.nll_maps(maps)
        size = (fx.image_size,) * 2
        out["maps"] = _rate(n, lambda: combine_levels(nll, size, params.maps.sigma))
        grid = combine_levels(nll, size, params.maps.sigma)
        out["upsample"] = _rate(n, lambda: to_image_size(grid, size))
        if heads.conv.memory is not None:
            chosen = nll if heads.conv.map_levels(params) is None else [nll[i] for i in heads.conv.map_levels(params)]
            out["verify"] = _rate(n, lambda: heads.conv.verified_scores(maps, chosen, params.maps.verify_share,
                                                                        params.maps.border))
    out["ms_per_image"] = {k: round(1000 / v, 2) for k, v in out.items()
                           if k in ("backbone", "prepare", "image_head", "conv_head", "maps", "upsample", "verify")}
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
