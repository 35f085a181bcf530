"""Defect families (seed 003, section 5.2): the flagged items clustered on their backbone features.

Rule: features standardised against the passed items (their mean removed, divided by their spread:
what is left is how an item differs from normal), PCA to at most 10 components, k-means for every
k in 2..8 (at most n - 1), and k = the one with the highest silhouette. t-SNE of the PCA
components draws the scatter (picture only; clusters come from k-means).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_COMPONENTS = 10
K_RANGE = (2, 8)
MIN_ITEMS = 4


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


def item_features(paths, model_dir, params) -> np.ndarray | None:
    """Pooled backbone features (N, D) of image files with the model's own extractor (the image head's);
    None when the model has no image head."""
    from pathlib import Path

    from defectflow.scoring import MODEL_FILE, load_model

    if not (Path(model_dir) / MODEL_FILE).is_file():
        return None
    fx = load_model(model_dir).extractor(params)
    feats = fx.extract(list(paths), n_transforms=1, on_bad_image="skip")
    return feats.mean(axis=1)
