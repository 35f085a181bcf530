"""Defect families against the true defect types: adjusted Rand index (ARI).

    python bench/families.py [--magtile-src ../shared/datasets/magnetic_tile] [--demo-qa reports/qa.json]

Magnetic tile (5 defect types: blowhole, break, crack, fray, uneven): every defect image of the test
set (bench/magtile_layout.py), pooled backbone features (params.yaml's backbone, 224 px,
input_norm percentile), standardised against 200 good training images, then the report's rule
(defectflow.reporting.families: PCA 10, k-means, k by silhouette over 2..8) and, for reference, k = 5.
Variants: all pyramid levels (the report's features) and each level alone. The demo's figure is the
one evaluate wrote into reports/qa.json (flagged true defects only). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.magtile_layout import build  # noqa: E402
from defectflow.features import FeatureExtractor  # noqa: E402
from defectflow.reporting.families import adjusted_rand, cluster_families  # noqa: E402

N_GOOD = 200


def magtile(src: Path, seed: int = 0) -> dict:
    out = Path(tempfile.gettempdir()) / "magnetic_tile_mvtec_families"
    build(src, out, seed)
    defects = sorted(p for p in (out / "test").glob("*/*.jpg") if p.parent.name != "good")
    types = np.array([p.parent.name for p in defects])
    good = sorted((out / "train" / "good").glob("*.jpg"))
    good = [good[i] for i in np.random.default_rng(seed).choice(len(good), N_GOOD, replace=False)]
    fx = FeatureExtractor("efficientnet_lite0", image_size=224, input_norm="percentile")
    t0 = time.perf_counter()
    feats = fx.extract(defects + good, n_transforms=1, progress=True).mean(axis=1)
    seconds = time.perf_counter() - t0
    dims = level_slices(fx)
    f_def, f_good = feats[: len(defects)], feats[len(defects):]
    result = {"n_defects": len(defects), "types": {t: int((types == t).sum()) for t in np.unique(types)},
              "features_s": round(seconds, 1)}
    for name, sl in dims.items():
        rule = cluster_families(f_def[:, sl], f_good[:, sl], seed=seed, picture=False)
        five = cluster_families(f_def[:, sl], f_good[:, sl], seed=seed, k=5, picture=False)
        result[name] = {"k_rule": rule.k, "ari_rule": round(adjusted_rand(types, rule.labels), 4),
                        "ari_k5": round(adjusted_rand(types, five.labels), 4)}
    return result


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
    ap.add_argument("--demo-qa", type=Path, default=REPO / "reports" / "qa.json")
    args = ap.parse_args()
    out = {"magnetic_tile": magtile(args.magtile_src)}
    if args.demo_qa.is_file():
        fam = json.loads(args.demo_qa.read_text()).get("families") or {}
        out["demo"] = {k: fam.get(k) for k in ("k", "ari", "n", "silhouettes")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
