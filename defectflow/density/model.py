"""The density model: standardise, then coupling blocks with fixed permutations, standard normal base.

Negative log-likelihood of a feature vector ``x`` (nats), every term included::

    z, log_det = model(x)                          # log_det = log |det dz/dx|
    nll(x) = 0.5 * ||z||^2 + 0.5 * D * log(2 pi) - log_det

The anomaly score of an image is ``nll / D`` (nats per dimension) averaged over its
test-time transforms: higher = less likely under the good-product density = more anomalous.

>>> m = DensityModel(dim=8, n_blocks=2, hidden=16)
>>> m.nll(torch.randn(5, 8)).shape
torch.Size([5])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from defectflow.density.blocks import AffineCoupling, FixedPermutation, InvertibleBlock, Standardize

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class DensityConfig:
    """Everything needed to rebuild a :class:`DensityModel` (saved in model.pt)."""

    dim: int
    n_blocks: int = 8
    hidden: int = 512
    clamp: float = 2.0
    seed: int = 0          # permutations
    in_dim: Optional[int] = None   # raw feature dim when a fixed projection (PCA per scale) comes first

    def to_dict(self) -> dict:
        return asdict(self)


class DensityModel(nn.Module):
    """``Standardize -> [AffineCoupling -> FixedPermutation] * n_blocks`` onto N(0, I)."""

    def __init__(self, dim: int, n_blocks: int = 8, hidden: int = 512, clamp: float = 2.0, seed: int = 0,
                 mean: Tensor | None = None, std: Tensor | None = None, in_dim: int | None = None,
                 proj_mean: Tensor | None = None, proj: Tensor | None = None):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"DensityModel: n_blocks must be >= 1, got {n_blocks}")
        self.config = DensityConfig(int(dim), int(n_blocks), int(hidden), float(clamp), int(seed),
                                    None if in_dim is None else int(in_dim))
        if in_dim is not None:     # fixed linear projection raw features -> flow input (not trained)
            pm = torch.zeros(in_dim) if proj_mean is None else torch.as_tensor(proj_mean, dtype=torch.float32)
            pw = torch.zeros(in_dim, dim) if proj is None else torch.as_tensor(proj, dtype=torch.float32)
            if pm.shape != (in_dim,) or pw.shape != (in_dim, dim):
                raise ValueError(f"DensityModel: projection must be ({in_dim},) and ({in_dim}, {dim}), "
                                 f"got {tuple(pm.shape)} and {tuple(pw.shape)}")
            self.register_buffer("proj_mean", pm.clone())
            self.register_buffer("proj", pw.clone())
        blocks: list[InvertibleBlock] = [Standardize(dim, mean, std)]
        for i in range(n_blocks):
            blocks.append(AffineCoupling(dim, hidden=hidden, clamp=clamp))
            blocks.append(FixedPermutation(dim, seed=seed * 1000 + i))
        for a, b in zip(blocks, blocks[1:]):          # the graph's dims, checked once here
            if a.dim != b.dim:
                raise ValueError(f"DensityModel: {type(a).__name__} gives {a.dim} dims, "
                                 f"{type(b).__name__} takes {b.dim}")
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def from_config(cls, config: DensityConfig | dict) -> "DensityModel":
        cfg = config if isinstance(config, DensityConfig) else DensityConfig(**config)
        return cls(cfg.dim, cfg.n_blocks, cfg.hidden, cfg.clamp, cfg.seed, in_dim=cfg.in_dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def in_dim(self) -> int:
        """Width of the raw features :meth:`score` takes (``dim`` without a projection)."""
        return self.config.in_dim or self.config.dim

    def project(self, x: Tensor) -> Tensor:
        """Raw features ``(..., in_dim)`` -> flow input ``(..., dim)`` (identity without a projection)."""
        if self.config.in_dim is None:
            return x
        return (x - self.proj_mean) @ self.proj

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        """Data -> latent (``rev=False``) or latent -> data; returns (out, log|det d out / d in|)."""
        log_det = x.new_zeros(x.shape[0])
        for block in (reversed(self.blocks) if rev else self.blocks):
            x, ld = block(x, rev=rev)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> Tensor:
        return self(z, rev=True)[0]

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood per sample, nats, shape (B,)."""
        z, log_det = self(x)
        return 0.5 * (z ** 2).sum(dim=1) + 0.5 * self.dim * _LOG_2PI - log_det

    def nll_per_dim(self, x: Tensor) -> Tensor:
        """NLL per sample divided by the feature dim (the training loss and the score unit)."""
        return self.nll(x) / self.dim

    @torch.no_grad()
    def score(self, feats: Tensor, batch_size: int = 1024) -> Tensor:
        """Anomaly score per image from ``(N, T, D)`` features: mean over T of NLL per dim."""
        if feats.dim() != 3 or feats.shape[2] != self.in_dim:
            raise ValueError(f"score: expected features of shape (N, T, {self.in_dim}), got {tuple(feats.shape)}")
        n, t, d = feats.shape
        flat = self.project(feats.reshape(n * t, d))
        out = torch.cat([self.nll_per_dim(flat[i:i + batch_size]) for i in range(0, n * t, batch_size)]) \
            if n * t else flat.new_zeros(0)
        return out.reshape(n, t).mean(dim=1)

    def score_graph(self, feats: Tensor) -> Tensor:
        """:meth:`score` without batching or checks, for export: ``(N, T, in_dim) -> (N,)``."""
        n, t, d = feats.shape
        return self.nll_per_dim(self.project(feats.reshape(n * t, d))).reshape(n, t).mean(dim=1)
