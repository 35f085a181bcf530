"""Defect families (seed 003, section 5.2): the flagged items clustered on the features of their
anomalous region (:mod:`defectflow.reporting.region_features`).

Rule: each flagged item's region features (its backbone patches minus their nearest passed patches,
pooled with weights rising with the patch's distance to normal, unit length), standardised, PCA to
at most 10 components, k-means for every k in 2..8 (at most n - 1), and k = the one with the highest
silhouette. t-SNE of the PCA components draws the scatter (picture only; clusters come from k-means).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_COMPONENTS = 10
K_RANGE = (2, 8)
MIN_ITEMS = 4
MAX_ITEMS = 2000       # flagged images grouped per report (a seeded sample above it: t-SNE's cost)


@dataclass
class Families:
    labels: np.ndarray                  # cluster per item, 0..k-1
    k: int
    silhouettes: dict = field(default_factory=dict)   # k -> silhouette
    xy: np.ndarray | None = None        # t-SNE picture
    explained: float = 0.0              # share of variance the PCA keeps


def standardise(features: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Features minus the reference (passed items) mean, over its std; over their own without a reference."""
    x = np.asarray(features, np.float64)
    ref = x if reference is None or len(reference) < 2 else np.asarray(reference, np.float64)
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)


def cluster_families(features: np.ndarray, reference: np.ndarray | None = None, seed: int = 0,
                     k: int | None = None, picture: bool = True) -> Families | None:
    """Families of ``features`` (N, D) by the module's rule (``k`` fixes the count); None below 4 items."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    x = standardise(features, reference)
    n = len(x)
    if n < MIN_ITEMS:
        return None
    pca = PCA(n_components=min(MAX_COMPONENTS, n - 1, x.shape[1]), random_state=seed)
    z = pca.fit_transform(x)
    fits = {}
    ks = [k] if k else range(K_RANGE[0], min(K_RANGE[1], n - 1) + 1)
    for kk in ks:
        lab = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit_predict(z)
        sil = float(silhouette_score(z, lab)) if 1 < len(set(lab)) < n else -1.0
        fits[kk] = (sil, lab)
    best = max(fits, key=lambda kk: fits[kk][0])
    xy = None
    if picture:
        from sklearn.manifold import TSNE
        xy = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) / 3))), random_state=seed,
                  init="pca").fit_transform(z)
    return Families(fits[best][1], best, {kk: round(v[0], 4) for kk, v in fits.items()}, xy,
                    float(pca.explained_variance_ratio_.sum()))


def adjusted_rand(true_types, labels) -> float | None:
    """Adjusted Rand index of the families against the true defect types (None with < 2 items)."""
    from sklearn.metrics import adjusted_rand_score

    t = np.asarray(true_types, dtype=object)
    return float(adjusted_rand_score(t.astype(str), labels)) if len(t) >= 2 else None


def item_features(flag_paths, ref_paths, model_dir, params, chunk: int = 16) -> tuple[np.ndarray, np.ndarray] | None:
    """Region features (N, C) of the readable flagged image files against the passed ones, with the
    backbone settings of the model's image head, and the (N,) readable mask of ``flag_paths``;
    None when the model has no image head or no passed image is readable. The flagged images are read
    ``chunk`` at a time, so memory does not grow with their number (only the (N, C) features do)."""
    from pathlib import Path

    from defectflow.conv_head import extract_maps, map_extractor
    from defectflow.reporting.region_features import LEVELS, RegionReference
    from defectflow.scoring import MODEL_FILE, load_model
    from defectflow.stage import trim_memory

    if not (Path(model_dir) / MODEL_FILE).is_file():
        return None
    model = load_model(model_dir)
    fx = model.extractor(params)                           # checks the backbone weights are the training ones
    mx = map_extractor({**model.features, "levels": list(LEVELS), "input_norm": fx.input_norm}, params)
    ref_maps, ref_ok, _ = extract_maps(mx, list(ref_paths), on_bad_image="skip", desc="family maps")
    if not ref_ok.any():
        return None
    reference = RegionReference(ref_maps, seed=params.seed)
    del ref_maps
    trim_memory()
    flag_paths = list(flag_paths)
    feats, oks = [], []
    for a in range(0, len(flag_paths), chunk):
        maps, ok, _ = extract_maps(mx, flag_paths[a:a + chunk], on_bad_image="skip", desc="family maps")
        oks.append(ok)
        if ok.any():
            feats.append(reference.features(maps))
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    if not ok.any():
        return None
    return np.concatenate(feats), ok
