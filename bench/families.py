"""Defect families against the true defect types: adjusted Rand index (ARI), before / after.

    python bench/families.py [--magtile-src ../shared/datasets/magnetic_tile] [--demo-dir DIR] [--demo-qa reports/qa.json] [--seed 0]

Two feature sets, each clustered by the report's rule (defectflow.reporting.families: PCA 10, k-means,
k by silhouette over 2..8) and, for reference, with k = the number of true types:
- ``pooled`` (before): global pooled backbone features of all pyramid levels, standardised against
  the good images (the report's features until the region features; ``--pooled-levels`` adds each level alone);
- ``region`` (after, the report's now): defectflow.reporting.region_features (the difference to the
  nearest normal patch, pooled under the item's own anomaly).
Backbone: params.yaml's (efficientnet_lite0, 224 px, input_norm percentile).
Sets: magnetic tile (every defect image of bench/magtile_layout.py's test set, 5 types, 200 good
training images as reference) and the demo (``defectflow demo --size small`` + the frames stage into
``--demo-dir``, built when missing: the defect products' frames from the cameras that see the defect
(passes.csv defect_cameras), cropped to their track box, 4 types; 200 good training frames as
reference). ``--demo-qa``: also the figure evaluate wrote into reports/qa.json, when present. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.magtile_layout import build  # noqa: E402
from defectflow.anomaly_maps import MapExtractor, load_rgb  # noqa: E402
from defectflow.features import FeatureExtractor  # noqa: E402
from defectflow.reporting.families import adjusted_rand, cluster_families  # noqa: E402
from defectflow.reporting.region_features import LEVELS, region_features  # noqa: E402

N_GOOD = 200
BACKBONE = {"backbone": "efficientnet_lite0", "image_size": 224, "input_norm": "percentile"}


def evaluate_set(defects: list, types: np.ndarray, good: list, seed: int = 0, pooled_levels: bool = False) -> dict:
    """ARI of both feature sets on in-memory float RGB images (defects with their types, good reference)."""
    fx = FeatureExtractor(BACKBONE["backbone"], image_size=BACKBONE["image_size"], input_norm=BACKBONE["input_norm"])
    mx = MapExtractor(BACKBONE["backbone"], image_size=BACKBONE["image_size"], input_norm=BACKBONE["input_norm"],
                      levels=LEVELS)
    n_types = len(np.unique(types))
    result = {"n_defects": len(defects), "types": {t: int((types == t).sum()) for t in np.unique(types)}}
    t0 = time.perf_counter()
    feats = fx.features(defects + good, n_transforms=1).mean(axis=1)
    f_def, f_good = feats[: len(defects)], feats[len(defects):]
    slices = level_slices(fx) if pooled_levels else {"all_levels": slice(None)}
    for name, sl in slices.items():
        key = "pooled" if name == "all_levels" else f"pooled_{name}"
        result[key] = score(f_def[:, sl], f_good[:, sl], types, n_types, seed)
    result["pooled"]["seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    x = region_features(batched_maps(mx, defects), batched_maps(mx, good), seed=seed)
    result["region"] = score(x, None, types, n_types, seed)
    result["region"]["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def score(x: np.ndarray, ref, types: np.ndarray, n_types: int, seed: int) -> dict:
    rule = cluster_families(x, ref, seed=seed, picture=False)
    fixed = cluster_families(x, ref, seed=seed, k=n_types, picture=False)
    return {"k_rule": rule.k, "ari_rule": round(adjusted_rand(types, rule.labels), 4),
            f"ari_k{n_types}": round(adjusted_rand(types, fixed.labels), 4)}


def batched_maps(mx: MapExtractor, images: list, batch: int = 32) -> list[np.ndarray]:
    parts = [mx.maps(images[i:i + batch]) for i in range(0, len(images), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(mx.levels))]


def magtile(src: Path, seed: int = 0, pooled_levels: bool = False) -> dict:
    out = Path(tempfile.gettempdir()) / ("magnetic_tile_mvtec_families" + (f"_s{seed}" if seed else ""))
    build(src, out, seed)
    defects = sorted(p for p in (out / "test").glob("*/*.jpg") if p.parent.name != "good")
    types = np.array([p.parent.name for p in defects])
    good = sorted((out / "train" / "good").glob("*.jpg"))
    good = [good[i] for i in np.random.default_rng(seed).choice(len(good), N_GOOD, replace=False)]
    size = BACKBONE["image_size"]
    return evaluate_set([load_rgb(p, size) for p in defects], types, [load_rgb(p, size) for p in good], seed,
                        pooled_levels)


def demo(folder: Path, seed: int = 0) -> dict:
    """The demo's defect frames from the cameras that see the defect, cropped to the track box."""
    import pandas as pd

    frames = folder / "frames"
    if not (frames / "manifest.parquet").is_file():
        py = [sys.executable, "-m", "defectflow.cli"]
        subprocess.run(py + ["demo", "--size", "small", "--out", str(folder / "demo")], check=True, cwd=REPO)
        subprocess.run(py + ["stage", "frames", "--inp", str(folder / "demo"), "--out", str(frames)], check=True,
                       cwd=REPO)
    m = pd.read_parquet(frames / "manifest.parquet")
    passes = pd.read_csv(folder / "demo" / "passes.csv", dtype=str).fillna("")
    sees = {(r.run, int(r.pass_index)): set(r.defect_cameras.split(";")) for r in passes.itertuples()}
    d = m[(m["label"] == "defect") & m["defect_type"].notna()]
    d = d[[row.camera in sees.get((row.run, int(row.pass_index)), set()) for row in d.itertuples()]]
    good = m[(m["split"] == "train") & (m["label"] == "good")]
    good = good.iloc[np.random.default_rng(seed).choice(len(good), min(N_GOOD, len(good)), replace=False)]
    return evaluate_set([crop(r) for r in d.itertuples()], d["defect_type"].to_numpy(str),
                        [crop(r) for r in good.itertuples()], seed)


def crop(row) -> np.ndarray:
    img = load_rgb(row.image_path)
    box = img[int(row.track_y0):int(row.track_y1), int(row.track_x0):int(row.track_x1)]
    return load_rgb_resized(box, BACKBONE["image_size"])


def load_rgb_resized(img: np.ndarray, size: int) -> np.ndarray:
    import cv2
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_LINEAR)


def level_slices(fx: FeatureExtractor) -> dict[str, slice]:
    """Column ranges of the pooled features: all, and each pyramid level (channels per layer)."""
    out = {"all_levels": slice(None)}
    start = 0
    for layer in fx.spec.layers:
        ch = int(layer.channels)
        out[f"stride_{layer.stride}"] = slice(start, start + ch)
        start += ch
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--magtile-src", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    ap.add_argument("--demo-dir", type=Path, default=Path(tempfile.gettempdir()) / "defectflow_families_demo")
    ap.add_argument("--demo-qa", type=Path, default=REPO / "reports" / "qa.json")
    ap.add_argument("--seed", type=int, default=0, help="layout split, good-image draw, k-means and patch bank")
    ap.add_argument("--pooled-levels", action="store_true", help="also the pooled features of each level alone")
    args = ap.parse_args()
    out = {"seed": args.seed, "magnetic_tile": magtile(args.magtile_src, args.seed, args.pooled_levels),
           "demo": demo(args.demo_dir, args.seed)}
    if args.demo_qa.is_file():
        fam = json.loads(args.demo_qa.read_text()).get("families") or {}
        out["demo_report"] = {k: fam.get(k) for k in ("k", "ari", "n", "silhouettes")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
