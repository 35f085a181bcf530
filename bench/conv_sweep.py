"""Conv-head settings swept offline on a suite work folder: backbone maps extracted once, one fit per variant.

    python bench/conv_sweep.py WORK FOLDER '[{}, {"temper": 0.3}, {"epochs": 32}, {"n_blocks": 8}]'

WORK is a ``bench/suite.py --work`` dataset folder (its ``synth/manifest.parquet``, ``model/card.json`` and
``model/val_split.json`` give the rows, input size and the epoch-selection images), FOLDER its MVTec-layout
dataset. Each variant overrides fields of :class:`defectflow.density.conv_fit.ConvFitConfig` (``{}`` = the
params.yaml defaults, which reproduces the suite's conv head). One JSON line per variant: fit seconds and
the test image AUROC of the conv score (``max`` and ``topk`` of the map's cells).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defectflow.anomaly_maps import cell_scores  # noqa: E402
from defectflow.config import load_params_with  # noqa: E402
from defectflow.conv_head import extract_maps, map_extractor  # noqa: E402
from defectflow.density.conv_fit import ConvFitConfig, fit_conv_flow  # noqa: E402
from defectflow.scoring import select_rows  # noqa: E402


def main(work: Path, folder: str, variants: list[dict]) -> None:
    params = load_params_with(str(ROOT / "params.yaml"), {"source.kind": "images", "source.path": folder})
    card = json.loads((work / "model" / "card.json").read_text())
    size = int(card["conv"]["features"]["image_size"])
    df = pd.read_parquet(work / "synth" / "manifest.parquet")
    picks = json.loads((work / "model" / "val_split.json").read_text())["select"]
    tp, cp = params.train, params.train.conv
    fx = map_extractor({"backbone": tp.backbone, "image_size": size, "levels": list(cp.levels), "pretrained": True,
                        "weights": None, "input_norm": tp.input_norm}, params)
    train = df[(df.split == "train") & (df.label == "good")]
    test = select_rows(df, "test")
    test = test[test.label.isin(["good", "defect"])]
    y = (test.label == "defect").to_numpy()
    t0 = time.time()
    tr = extract_maps(fx, train.image_path.tolist())[0]
    va = extract_maps(fx, df[df.item_id.isin(picks)].image_path.tolist())[0]
    te = extract_maps(fx, test.image_path.tolist())[0]
    print(f"maps of {len(train)} train, {len(picks)} val, {len(test)} test images in {time.time() - t0:.0f} s",
          file=sys.stderr)
    base = ConvFitConfig(n_blocks=cp.n_blocks, hidden_ratio=cp.hidden_ratio, kernels=tuple(cp.kernels),
                         subnet=cp.subnet, clamp=cp.clamp, epochs=cp.epochs, batch_size=cp.batch_size, lr=cp.lr,
                         weight_decay=cp.weight_decay, seed=params.seed, threads=tp.fit_threads,
                         groups=tuple(cp.groups()), local_average=cp.local_average, temper=cp.temper,
                         merge_mode=cp.merge_mode, context_channels=cp.context_channels)
    for v in variants:
        cfg = dataclasses.replace(base, **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        t0 = time.time()
        torch.manual_seed(params.seed)
        res = fit_conv_flow(tr, va, cfg)
        nll = [-t.numpy() / c for t, c in zip(res.model.log_likelihood_maps(te), res.model.channels)]
        out = {"work": work.name, **v, "fit_s": round(time.time() - t0)}
        for method in ("max", "topk"):
            out[method] = round(float(roc_auc_score(y, cell_scores(nll, method, params.maps.top_fraction,
                                                                   params.maps.border))), 4)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
