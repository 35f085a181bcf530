"""Offline sweep of the conv head's verified image score on suite work folders: which memory, which
cells, which fusion weight. Chooses nothing: it prints the figures the defaults are chosen from, over
the whole suite (never per dataset).

    python bench/verify_sweep.py WORK_DIR [WORK_DIR ...] [--sizes 4096,16384] [--cells 16,32,64]

Per folder (a ``bench/suite.py --work DIR`` dataset folder): the backbone maps of the good train
images, the standardisation part of the good validation images (``val_split.json``) and the test
images are extracted once; each memory (``--coreset``: ``two_stage``, the library's; ``chunked``: each
chunk of training patches keeps its share, as the kNN baseline's) is fitted and timed; the memory
distance is computed at every inner cell. Printed per memory, one JSON line: image AUROC at every
cell (``all``, PatchCore's score) and at the ``k`` highest cells of each proposal rule (``map``: the
conv map of the shown groups, the pipeline's; ``union``: the ``k / G`` highest cells of each group's
own map), and the fused score (conv head standardised on the same validation images as
``fusion.json``) at several image-head weights.
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


def chunked_coreset(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Each chunk of ``memlib.CHUNK`` shuffled rows keeps its share of ``size`` by greedy k-center (one pass)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    w = rng.standard_normal((d, memlib.PROJECTION_DIM)).astype(np.float32) / np.sqrt(memlib.PROJECTION_DIM)
    order = rng.permutation(n)
    keep = []
    for start in range(0, n, memlib.CHUNK):
        idx = order[start:start + memlib.CHUNK]
        k = max(1, int(round(size * len(idx) / n)))
        keep.append(idx[memlib.greedy_kcenter(x[idx] @ w, k, rng)])
    return np.sort(np.concatenate(keep))


def all_distances(bank: np.ndarray, q: np.ndarray, block: int = 8192) -> np.ndarray:
    """Nearest-memory distance of every row of ``q`` ``(n, C)`` (float32 matrix products in blocks)."""
    b = torch.from_numpy(bank)
    bsq = (b * b).sum(1)
    out = np.empty(len(q), np.float32)
    for i in range(0, len(q), block):
        a = torch.from_numpy(np.ascontiguousarray(q[i:i + block]))
        d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + bsq[None]
        out[i:i + block] = d.min(1).values.clamp_min(0).sqrt().numpy()
    return out


def group_cells(nll: list[np.ndarray], shape: tuple[int, int]) -> list[np.ndarray]:
    """Each group's map on the finest grid (as :func:`cell_map` resamples)."""
    return [cell_map([g]) if g.shape[1:] == shape else
            cell_map([np.zeros((len(g), *shape), np.float32), g]) * 2 for g in nll]


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
        per_group = [inner(g, border).reshape(n, -1) for g in group_cells(chosen, (h, w))]
        parts[name] = {"q": np.ascontiguousarray(q), "map": inner(cell_map(chosen), border).reshape(n, -1),
                       "groups": per_group}
    extract_s = time.perf_counter() - t0
    auc = lambda s: round(float(roc_auc_score(y, s)), 4)  # noqa: E731
    out = []
    for kind in coresets:
        for size in sizes:
            t0 = time.perf_counter()
            idx = memlib.coreset(flat, size, params.seed) if kind == "two_stage" else chunked_coreset(flat, size, params.seed)
            fit_s = round(time.perf_counter() - t0, 1)
            bank = np.ascontiguousarray(flat[idx])
            d = {k: all_distances(bank, v["q"].reshape(-1, v["q"].shape[2])).reshape(v["q"].shape[:2])
                 for k, v in parts.items()}
            row = {"work": work.name, "coreset": kind, "memory": size, "of": len(flat), "fit_s": fit_s,
                   "extract_s": round(extract_s, 1), "image_head": auc(z_image),
                   "conv_map_max": auc(parts["test"]["map"].max(1)), "all": auc(d["test"].max(1))}

            def rule(part: str, how: str, k: int) -> np.ndarray:
                v, dist = parts[part], d[part]
                if how == "map":
                    top = np.argpartition(-v["map"], min(k, v["map"].shape[1] - 1), axis=1)[:, :k]
                else:
                    kk = max(1, k // len(v["groups"]))
                    top = np.concatenate([np.argpartition(-g, kk, axis=1)[:, :kk] for g in v["groups"]], axis=1)
                return np.take_along_axis(dist, top, 1).max(1)

            for how in ("map", "union"):
                for k in cells:
                    s_te, s_st = rule("test", how, k), rule("std", how, k)
                    z = (s_te - s_st.mean()) / max(s_st.std(ddof=1), 1e-12)
                    row[f"{how}{k}"] = auc(s_te)
                    for wt in weights:
                        row[f"{how}{k}_w{wt}"] = auc(wt * z_image + (1 - wt) * z)
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
