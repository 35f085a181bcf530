"""A memory of normal patches that verifies the conv head's most anomalous cells (PatchCore's kNN, used sparingly).

The conv density model ranks every cell of an image cheaply, but its value at the map's maximum is
noisy on good images: a rare normal patch can score as high as a small defect. A nearest-neighbour
distance to the training patches does not have that noise (Roth et al. 2022, "Towards total recall in
industrial anomaly detection"), but measuring it at every cell costs far more than the backbone on a
CPU (about 30x at 448 px). So the conv head proposes and the memory verifies: the image score is the
largest distance to the memory over the map's ``k`` highest cells (``maps.verify_share`` of them: :func:`verify_count`).

Patch features are PatchCore's: every conv level averaged over each position's ``local_average``
neighbourhood (the conv head's own smoothing), resized to the finest level's grid, concatenated. The
memory is a greedy k-center coreset of the training patches (``train.conv.memory`` of them), chosen on
a seeded random projection, first chunk by chunk, then over the union: it keeps the rare normal patches
a random sample loses (synthetic small defects on bottle: kNN AUROC 0.80 with 4096 coreset patches,
0.76 with 4096 random ones).

>>> mem = PatchMemory.fit(train_patches, size=4096, seed=0)      # doctest: +SKIP
>>> scores = mem.verify(patch_maps, cells, k=16)                    # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectflow.density.conv_groups import smooth

PROJECTION_DIM = 128
MIN_VERIFY_CELLS = 4
CHUNK = 16384
OVERSAMPLE = 4          # the chunked first pass keeps this many times the final share


def verify_count(share: float, n_cells: int) -> int:
    """How many of a map's ``n_cells`` (inner) cells the memory verifies: ``share`` of them, at least
    ``MIN_VERIFY_CELLS`` (and at most all): the verification's cost grows with the grid, as the backbone's."""
    return int(min(n_cells, max(MIN_VERIFY_CELLS, round(share * n_cells))))


def patch_maps(level_maps: Sequence[torch.Tensor], local_average: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[(N, C_i, h_i, w_i)]`` -> ``(N, sum C_i, h, w)``: each level smoothed (``local_average``), resized
    bilinearly to ``size`` (default: the finest level's grid) and concatenated."""
    if size is None:
        size = max((tuple(m.shape[2:]) for m in level_maps), key=lambda s: s[0] * s[1])
    out = []
    for m in level_maps:
        s = smooth(m, local_average)
        if tuple(s.shape[2:]) != tuple(size):
            s = F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(s)
    return torch.cat(out, dim=1)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    i = np.abs(i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def _smooth_taps(ys: np.ndarray, xs: np.ndarray, h: int, w: int, k: int):
    """The taps of :func:`~defectflow.density.conv_groups.smooth` (``k`` x ``k`` average, reflected at the
    borders; on maps too small to reflect, the mean of the neighbours inside) at positions ``ys, xs`` ``(N, P)``:
    source rows, columns and weights ``(N, P, k * k)``."""
    p = k // 2
    dy, dx = (a.ravel() for a in np.mgrid[-p:p + 1, -p:p + 1])
    yy, xx = ys[..., None] + dy, xs[..., None] + dx
    if min(h, w) > p:
        return _reflect(yy, h), _reflect(xx, w), np.full(yy.shape, 1.0 / (k * k), np.float32)
    ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).astype(np.float32)
    return np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1), ok / ok.sum(axis=-1, keepdims=True)


def _source(dst: np.ndarray, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resampling (``align_corners=False``, as torch): the two source indices and the second's weight."""
    src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def patch_vectors(level_maps: Sequence[np.ndarray], ys: np.ndarray, xs: np.ndarray, local_average: int,
                  size: tuple[int, int]) -> np.ndarray:
    """:func:`patch_maps` at grid positions ``ys, xs`` ``(N, P)`` of the ``size`` grid only: ``(N, P, sum C_i)``
    (what scoring needs: the features of a few cells, not of the whole map). One gather per level."""
    parts = []
    for m in level_maps:
        m = np.asarray(m, np.float32)
        h, w = m.shape[2:]
        if (h, w) == tuple(size):
            ty, tx, tw = _smooth_taps(ys, xs, h, w, local_average)
        else:                                  # bilinear corners, each smoothed
            y0, y1, ly = _source(ys.astype(np.float64), h, size[0])
            x0, x1, lx = _source(xs.astype(np.float64), w, size[1])
            taps = [(_smooth_taps(yy, xx, h, w, local_average), (wy * wx)[..., None])
                    for yy, wy in ((y0, 1 - ly), (y1, ly)) for xx, wx in ((x0, 1 - lx), (x1, lx))]
            ty = np.concatenate([t[0][0] for t in taps], axis=-1)
            tx = np.concatenate([t[0][1] for t in taps], axis=-1)
            tw = np.concatenate([t[0][2] * t[1] for t in taps], axis=-1)
        rows = np.arange(len(m))[:, None, None]
        v = m.transpose(0, 2, 3, 1)[rows, ty, tx]                      # (N, P, T, C)
        parts.append(np.einsum("nptc,npt->npc", v, tw.astype(np.float32)))
    return np.concatenate(parts, axis=2)


def greedy_kcenter(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` rows of ``p`` chosen by greedy k-center (each next row the farthest from those chosen)."""
    if k >= len(p):
        return np.arange(len(p))
    sq = (p * p).sum(1)
    first = int(rng.integers(len(p)))
    mind = sq - 2.0 * (p @ p[first]) + sq[first]
    chosen = [first]
    for _ in range(k - 1):
        j = int(np.argmax(mind))
        chosen.append(j)
        np.minimum(mind, sq - 2.0 * (p @ p[j]) + sq[j], out=mind)
    return np.asarray(chosen)


def coreset(x: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a greedy k-center coreset of ``size`` rows of ``x`` ``(n, d)`` (see the module docstring).
    Rows are projected chunk by chunk: no projected copy of the whole set is held. The greedy steps are small
    matrix-vector products: they run on one BLAS thread (threads of a shared pool only wait on each other
    there: 16,384 of 752k screw patches took 262 s with the default pool on a loaded box)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _coreset(x, size, seed)


def _coreset(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, d = x.shape
    if size >= n:
        return np.arange(n)
    w = None
    if d > PROJECTION_DIM:
        w = rng.standard_normal((d, PROJECTION_DIM)).astype(np.float32) / np.sqrt(PROJECTION_DIM)
    project = (lambda rows: x[rows] @ w) if w is not None else (lambda rows: x[rows])
    candidates = np.arange(n)
    if n > 2 * CHUNK:
        order = rng.permutation(n)
        share = min(1.0, OVERSAMPLE * size / n)
        keep = []
        for start in range(0, n, CHUNK):
            idx = order[start:start + CHUNK]
            keep.append(idx[greedy_kcenter(project(idx), max(1, int(np.ceil(share * len(idx)))), rng)])
        candidates = np.concatenate(keep)
    return np.sort(candidates[greedy_kcenter(project(candidates), size, rng)])


class PatchMemory:
    """Coreset of normal patch features ``bank (M, C)`` and the nearest-neighbour distance to it."""

    def __init__(self, bank: np.ndarray):
        bank = np.ascontiguousarray(bank, np.float32)
        if bank.ndim != 2 or not len(bank):
            raise ValueError(f"PatchMemory: bank must be (M, C) with M >= 1, got {bank.shape}")
        self.bank = bank
        self.bank_sq = (bank * bank).sum(1)
        # ||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b): the bracket for every b is one product of [q, 1] with
        # [-2 b, ||b||^2]; ||q||^2 is added after the minimum (one (n, M) array, not three)
        self._folded = np.ascontiguousarray(np.concatenate([-2.0 * bank, self.bank_sq[:, None]], axis=1).T)

    @classmethod
    def fit(cls, patches: np.ndarray, size: int, seed: int = 0) -> "PatchMemory":
        """The memory of ``size`` coreset rows of training patches ``(n, C)``."""
        patches = np.asarray(patches, np.float32)
        if not np.isfinite(patches).all():
            raise ValueError("PatchMemory: training patches contain NaN or inf")
        return cls(patches[coreset(patches, size, seed)])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def nearest(self, queries: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance of each row of ``queries`` ``(n, C)`` to its nearest memory patch, and that
        patch's row in ``bank``. The product finds the nearest row; its distance is then computed directly
        (no cancellation, and the same bits whatever BLAS's thread count: threads and Dask workers agree)."""
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"PatchMemory: queries must be (n, {self.dim}), got {q.shape}")
        dist, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
        for i in range(0, len(q), block):
            a = q[i:i + block]
            part = np.concatenate([a, np.ones((len(a), 1), np.float32)], axis=1) @ self._folded
            j = part.argmin(axis=1)
            idx[i:i + block] = j
            diff = a - self.bank[j]
            dist[i:i + block] = np.sqrt((diff * diff).sum(1))
        return dist, idx

    def distances(self, queries: np.ndarray, block: int = 4096) -> np.ndarray:
        """Euclidean distance of each row of ``queries`` ``(n, C)`` to its nearest memory patch."""
        return self.nearest(queries, block)[0]

    def verify(self, queries: np.ndarray) -> np.ndarray:
        """Image scores: the largest memory distance over each image's query patches ``(N, k, C)``."""
        n, k, c = queries.shape
        return self.distances(queries.reshape(n * k, c)).reshape(n, k).max(axis=1).astype(np.float64)

    def save(self, path: Path | str) -> None:
        np.save(path, self.bank)

    @classmethod
    def load(cls, path: Path | str) -> "PatchMemory":
        try:
            bank = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable patch memory ({err}); retrain") from None
        return cls(bank)
