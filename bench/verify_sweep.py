"""Offline sweep of the conv head's verified image score on suite work folders: which memory, which
cells, which fusion weight. Chooses nothing: it prints the figures the defaults are chosen from, over
the whole suite (never per dataset).

    python bench/verify_sweep.py WORK_DIR [WORK_DIR ...] [--sizes 4096,16384] [--cells 16,32,64]

Per folder (a ``bench/suite.py --work DIR`` dataset folder): the backbone maps of the good train
images, the standardisation part of the good validation images (``val_split.json``) and the test
images are extracted once; each memory (``--coreset``: ``two_stage``, the library's; ``chunked``: each
chunk of training patches keeps its share, the kNN baseline's ``greedy_coreset``) is fitted and timed; the
memory distance is computed at every inner cell. Printed per memory, one JSON line: image AUROC at every
cell (``all``, PatchCore's score) and at the conv map's ``k`` highest cells (``map<k>``: the pipeline's
score when ``maps.verify_share`` gives ``k`` cells), and the fused score (conv head standardised on the
same validation images as ``fusion.json``) at several image-head weights.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "bench"))

from baselines import greedy_coreset  # noqa: E402

from defectflow.anomaly_maps import cell_map, inner  # noqa: E402
from defectflow.config import load_params_with  # noqa: E402
from defectflow.conv_head import extract_maps  # noqa: E402
from defectflow.density import memory as memlib  # noqa: E402
from defectflow.scoring import load_heads, select_rows  # noqa: E402


def patches(heads, maps) -> np.ndarray:
    """``(N, C, h, w)`` patch features of backbone maps (the memory's)."""
    k = heads.conv.model.config.local_average
    with torch.no_grad():
        return np.concatenate([memlib.patch_maps([torch.from_numpy(m[i:i + 32]) for m in maps], k).numpy()
                               for i in range(0, len(maps[0]), 32)])


def sweep(work: Path, sizes: list[int], cells: list[int], coresets: list[str], weights: list[float],
          border: int = 1) -> list[dict]:
    items = pd.read_parquet(work / "synth" / "manifest.parquet")
    params = load_params_with(ROOT / "params.yaml", {})
    heads = load_heads(work / "model")
    fx = heads.conv.extractor(params)
    tr = items[(items.split == "train") & (items.label == "good")]
    split = json.loads((work / "model" / "val_split.json").read_text())
    st = items[items.item_id.isin(split["standardise"])]
    te = select_rows(items, "test")
    te = te[te.label.isin(["good", "defect"])]
    y = (te.label == "defect").to_numpy()
    scores = pd.read_parquet(work / "reports" / "scores.parquet").set_index("item_id").loc[te.item_id]
    fusion = json.loads((work / "model" / "fusion.json").read_text())["heads"]
    z_image = (scores.score_image.to_numpy() - fusion["image"]["mean"]) / fusion["image"]["std"]
    t0 = time.perf_counter()
    train_maps, _, _ = extract_maps(fx, tr.image_path.tolist())
    ptr = patches(heads, train_maps)
    flat = np.ascontiguousarray(ptr.transpose(0, 2, 3, 1).reshape(-1, ptr.shape[1]))
    del ptr, train_maps
    parts = {}
    for name, rows in (("std", st), ("test", te)):
        maps, _, _ = extract_maps(fx, rows.image_path.tolist())
        p = patches(heads, maps)
        n, c, h, w = p.shape
        q = inner(p.transpose(1, 0, 2, 3).reshape(-1, h, w), border).reshape(c, n, -1).transpose(1, 2, 0)
        nll = heads.conv.nll_maps(maps, 2)
        shown = heads.conv.map_levels(params)
        chosen = nll if shown is None else [nll[i] for i in shown]
        parts[name] = {"q": np.ascontiguousarray(q), "map": inner(cell_map(chosen), border).reshape(n, -1)}
    extract_s = time.perf_counter() - t0
    auc = lambda s: round(float(roc_auc_score(y, s)), 4)  # noqa: E731
    out = []
    for kind in coresets:
        for size in sizes:
            t0 = time.perf_counter()
            idx = (memlib.coreset(flat, size, params.seed) if kind == "two_stage"
                   else greedy_coreset(flat, size / len(flat), params.seed))
            fit_s = round(time.perf_counter() - t0, 1)
            memory = memlib.PatchMemory(flat[idx])
            d = {k: memory.distances(v["q"].reshape(-1, v["q"].shape[2])).reshape(v["q"].shape[:2])
                 for k, v in parts.items()}
            row = {"work": work.name, "coreset": kind, "memory": size, "of": len(flat), "fit_s": fit_s,
                   "extract_s": round(extract_s, 1), "image_head": auc(z_image),
                   "conv_map_max": auc(parts["test"]["map"].max(1)), "all": auc(d["test"].max(1))}

            def top_cells(part: str, k: int) -> np.ndarray:
                cell = parts[part]["map"]
                top = np.argpartition(-cell, min(k, cell.shape[1] - 1), axis=1)[:, :k]
                return np.take_along_axis(d[part], top, 1).max(1)

            for k in cells:
                s_te, s_st = top_cells("test", k), top_cells("std", k)
                z = (s_te - s_st.mean()) / max(s_st.std(ddof=1), 1e-12)
                row[f"map{k}"] = auc(s_te)
                for wt in weights:
                    row[f"map{k}_w{wt}"] = auc(wt * z_image + (1 - wt) * z)
            s_st = d["std"].max(1)
            z = (d["test"].max(1) - s_st.mean()) / max(s_st.std(ddof=1), 1e-12)
            for wt in weights:
                row[f"all_w{wt}"] = auc(wt * z_image + (1 - wt) * z)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", nargs="+", type=Path)
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--cells", default="16,32,64")
    ap.add_argument("--coreset", default="two_stage,chunked")
    ap.add_argument("--weights", default="0.0,0.2,0.3")
    a = ap.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    for w in a.work:
        sweep(w, ints(a.sizes), ints(a.cells), a.coreset.split(","), [float(v) for v in a.weights.split(",")])


if __name__ == "__main__":
    main()
