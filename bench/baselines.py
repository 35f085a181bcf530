"""Reference baselines of the benchmark suite, on the same backbone maps the model sees.

- :func:`gauss_scores`: Mahalanobis distance on pooled multi-level features (Rippel et al. 2020:
  one Gaussian per pyramid level, Ledoit-Wolf shrunk covariance, distances summed over levels).
- :class:`PatchKnn`: PatchCore-style kNN (Roth et al. 2022): per-position features of levels 0
  and 1 (strides 8 and 16), each averaged over its 3 x 3 neighbourhood, level 1 upsampled to level
  0's grid and concatenated; a greedy k-center coreset of ``coreset`` (10%) of the training
  patches; score of a patch = distance to its nearest coreset patch; image score = the largest
  patch score; the map = patch scores upsampled and blurred (sigma 4 px at image size).

The greedy coreset runs on a seeded random projection to 128 dims (as PatchCore does) and, to fit
a CPU, chunk by chunk (each chunk of training patches keeps its own ``coreset`` share: a composable
coreset). Distances run in float32 matrix products, in blocks bounding memory.
"""
from __future__ import annotations

import numpy as np

from defectflow.density.memory import greedy_kcenter

PROJECTION_DIM = 128
CHUNK = 16384


def _pool3(m: np.ndarray) -> np.ndarray:
    """3 x 3 average over each position's neighbourhood (edge positions average what exists)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(m, np.float32))
    return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False).numpy()


def patch_features(map0: np.ndarray, map1: np.ndarray) -> np.ndarray:
    """``(N, C0, h, w)``, ``(N, C1, h/2, w/2)`` -> ``(N, h, w, C0 + C1)`` PatchCore patch features."""
    import torch
    import torch.nn.functional as F

    a = _pool3(map0)
    b = torch.from_numpy(_pool3(map1))
    b = F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False).numpy()
    return np.ascontiguousarray(np.concatenate([a, b], axis=1).transpose(0, 2, 3, 1))


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def greedy_coreset(x: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a greedy k-center coreset of ``fraction`` of the rows of ``x`` (chunked, projected)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    proj = x
    if d > PROJECTION_DIM:
        w = rng.standard_normal((d, PROJECTION_DIM)).astype(np.float32) / np.sqrt(PROJECTION_DIM)
        proj = x @ w
    order = rng.permutation(n)
    keep = []
    for start in range(0, n, CHUNK):
        idx = order[start:start + CHUNK]
        k = max(1, int(round(fraction * len(idx))))
        keep.append(idx[greedy_kcenter(proj[idx], k, rng)])
    return np.sort(np.concatenate(keep))


class PatchKnn:
    """PatchCore-style nearest-neighbour scorer (see the module docstring)."""

    def __init__(self, coreset: float = 0.1, seed: int = 0, block: int = 4096):
        self.coreset, self.seed, self.block = coreset, seed, block

    def fit(self, map0: np.ndarray, map1: np.ndarray) -> "PatchKnn":
        feats = patch_features(map0, map1)
        flat = feats.reshape(-1, feats.shape[-1])
        self.bank = np.ascontiguousarray(flat[greedy_coreset(flat, self.coreset, self.seed)])
        self.bank_sq = (self.bank * self.bank).sum(1)
        return self

    def patch_scores(self, map0: np.ndarray, map1: np.ndarray) -> np.ndarray:
        """``(N, h, w)`` distance of every test patch to its nearest coreset patch."""
        feats = patch_features(map0, map1)
        n, h, w, c = feats.shape
        flat = feats.reshape(-1, c)
        out = np.empty(len(flat), np.float32)
        for i in range(0, len(flat), self.block):
            d = _sq_dists(flat[i:i + self.block], self.bank, self.bank_sq)
            out[i:i + self.block] = np.sqrt(d.min(axis=1))
        return out.reshape(n, h, w)


def knn_maps(patch: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """Patch scores ``(N, h, w)`` -> maps ``(N, size, size)``: bilinear upsampling, Gaussian blur."""
    import cv2

    k = 2 * int(np.ceil(4 * sigma)) + 1
    return np.stack([cv2.GaussianBlur(cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR), (k, k), sigma)
                     for p in patch])


def gauss_scores(train_levels: list[np.ndarray], test_levels: list[np.ndarray]) -> np.ndarray:
    """Sum over levels of the Mahalanobis distance of pooled features ``(N, C_l)`` to the training
    Gaussian of that level (Ledoit-Wolf shrinkage)."""
    from sklearn.covariance import LedoitWolf

    total = np.zeros(len(test_levels[0]))
    for tr, te in zip(train_levels, test_levels):
        tr, te = np.asarray(tr, np.float64), np.asarray(te, np.float64)
        lw = LedoitWolf().fit(tr)
        prec = lw.precision_
        diff = te - lw.location_
        total += np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", diff, prec, diff), 0.0))
    return total
