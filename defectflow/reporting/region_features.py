"""Features of an item's anomalous region, for the defect families (seed 003, section 5.2).

Backbone maps (levels 0 and 1: stride 8 pooled onto the stride-16 grid, concatenated) of the flagged
and the passed items; each patch standardised against the passed items' patches. A patch's anomaly
is its distance d to the nearest passed patch (a PatchCore-style map, independent of the model's heads).
An item's features: each patch minus its nearest passed patch (what is there instead of normal),
averaged with softmax weights exp((d - max d) / std d) over the item's patches (so the most anomalous
patches dominate, with no fixed region size), then scaled to unit length (the kind of deviation, not
its strength).

>>> feats = region_features(flag_maps, ref_maps)          # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from defectflow.density.memory import PatchMemory

LEVELS = (0, 1)
BANK_MAX = 16384        # passed patches kept for the nearest-neighbour search (random subset above it)


def patch_grid(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Level maps ``[(N, C_i, h_i, w_i)]`` average-pooled onto the coarsest grid and concatenated:
    ``(N, h * w, sum C)`` float32."""
    import torch
    import torch.nn.functional as F

    if not maps:
        raise ValueError("no feature maps")
    h = min(m.shape[2] for m in maps)
    w = min(m.shape[3] for m in maps)
    parts = [F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(m, np.float32)), (h, w)) for m in maps]
    grid = torch.cat(parts, dim=1)                         # (N, C, h, w)
    return grid.flatten(2).transpose(1, 2).contiguous().numpy()


class RegionReference:
    """The passed items' patches (standardisation and the nearest-neighbour bank) that flagged items'
    region features are measured against; ``features`` takes the flagged items in any number of chunks
    (each item's features depend only on it and the reference, so chunks give the same answer)."""

    def __init__(self, ref_maps: Sequence[np.ndarray], seed: int = 0):
        xr = patch_grid(ref_maps)
        if len(xr) < 1:
            raise ValueError("region features need at least one passed (reference) item")
        ref = xr.reshape(-1, xr.shape[2])
        self.mu, self.sd = ref.mean(0), ref.std(0) + 1e-6
        bank = (ref - self.mu) / self.sd
        if len(bank) > BANK_MAX:
            bank = bank[np.random.default_rng(seed).choice(len(bank), BANK_MAX, replace=False)]
        self.bank = bank
        self.memory = PatchMemory(bank)

    def features(self, flag_maps: Sequence[np.ndarray]) -> np.ndarray:
        """Residual features ``(N, C)`` of these flagged items' anomalous regions (module docstring)."""
        xf = patch_grid(flag_maps)
        n, p, c = xf.shape
        zf = (xf - self.mu) / self.sd
        dist, idx = self.memory.nearest(zf.reshape(-1, c), block=2048)
        dist, idx = dist.reshape(n, p), idx.reshape(n, p)
        weights = np.exp((dist - dist.max(1, keepdims=True)) / (dist.std(1, keepdims=True) + 1e-6))
        weights /= weights.sum(1, keepdims=True)
        pooled = np.einsum("np,npc->nc", weights, zf - self.bank[idx])
        return pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-9)


def region_features(flag_maps: Sequence[np.ndarray], ref_maps: Sequence[np.ndarray], *,
                    seed: int = 0) -> np.ndarray:
    """Residual features ``(N, C)`` of the flagged items' anomalous regions (module docstring)."""
    return RegionReference(ref_maps, seed=seed).features(flag_maps)
