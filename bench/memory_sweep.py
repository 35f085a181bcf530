"""Offline sweep of the conv head's patch memory on suite work folders: memory size x verified cells.

    python bench/memory_sweep.py WORK_DIR 4096,16384       # a bench/suite.py --work DIR/<dataset> folder

Extracts the backbone maps of the good train images and the test images once, builds each memory
(``defectflow.density.memory``: greedy coreset of the training patches), and prints one JSON line per
size: the image AUROC of the memory distance at every cell (``all``: PatchCore) and at the conv map's
``k`` highest inner cells (the pipeline's score for ``maps.verify_share`` giving ``k`` cells), and the fit time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defectflow.anomaly_maps import cell_map, inner  # noqa: E402
from defectflow.config import load_params_with  # noqa: E402
from defectflow.conv_head import extract_maps  # noqa: E402
from defectflow.density.memory import PatchMemory, patch_maps  # noqa: E402
from defectflow.scoring import load_heads, select_rows  # noqa: E402


def _patches(heads, maps) -> np.ndarray:
    k = heads.conv.model.config.local_average
    with torch.no_grad():
        return np.concatenate([patch_maps([torch.from_numpy(m[i:i + 32]) for m in maps], k).numpy()
                               for i in range(0, len(maps[0]), 32)])


def sweep(work: Path, sizes: list[int], border: int = 1) -> None:
    items = pd.read_parquet(work / "synth" / "manifest.parquet")
    params = load_params_with(ROOT / "params.yaml", {})
    heads = load_heads(work / "model")
    fx = heads.conv.extractor(params)
    tr = items[(items.split == "train") & (items.label == "good")]
    te = select_rows(items, "test")
    te = te[te.label.isin(["good", "defect"])]
    y = (te.label == "defect").to_numpy()
    train_maps, _, _ = extract_maps(fx, tr.image_path.tolist())
    test_maps, _, _ = extract_maps(fx, te.image_path.tolist())
    ptr = _patches(heads, train_maps)
    flat = ptr.transpose(0, 2, 3, 1).reshape(-1, ptr.shape[1])
    del ptr, train_maps
    pte = inner(_patches(heads, test_maps).transpose(1, 0, 2, 3).reshape(-1, *test_maps[0].shape[2:]), border)
    n, c = len(te), flat.shape[1]
    queries = pte.reshape(c, n, -1).transpose(1, 2, 0)                   # (n, inner cells, C)
    cells = inner(cell_map(heads.conv.nll_maps(test_maps, 2)), border).reshape(n, -1)
    order = np.argsort(-cells, axis=1)
    auc = lambda s: round(float(roc_auc_score(y, s)), 4)  # noqa: E731
    for size in sizes:
        t0 = time.perf_counter()
        memory = PatchMemory.fit(flat, size, params.seed)
        fit_s = round(time.perf_counter() - t0, 1)
        d = memory.distances(queries.reshape(-1, c)).reshape(n, -1)
        row = {"work": work.name, "memory": size, "of": len(flat), "fit_s": fit_s, "conv_max": auc(cells.max(1)),
               "all": auc(d.max(1))}
        row.update({f"k{k}": auc(np.take_along_axis(d, order[:, :k], 1).max(1)) for k in (4, 8, 16, 32, 64, 256)})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sweep(Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")])
