"""Invertible blocks of the density model. One contract for all of them.

Sign convention (the only place it is written)
----------------------------------------------
Every block maps the *data side* ``x`` to the *latent side* ``y`` (towards the standard
normal base) and returns the log-determinant of that direction's Jacobian::

    y, log_det = block(x)             # log_det = log |det dy/dx|, shape (B,)
    x, log_det_rev = block(y, rev=True)   # log_det_rev = log |det dx/dy| = -log_det

Inputs are ``(B, dim)`` float tensors; ``dim`` is fixed at construction, checked there
(each block states what it can take) and on every call (a wrong width raises ValueError
naming the block, the expected and the received width). Blocks preserve ``dim``.

>>> block = AffineCoupling(6, hidden=16, clamp=2.0)
>>> x = torch.randn(4, 6)
>>> y, ld = block(x)
>>> x2, ld_rev = block(y, rev=True)
>>> bool(torch.allclose(x, x2, atol=1e-5)), bool(torch.allclose(ld, -ld_rev, atol=1e-5))
(True, True)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_TWO_OVER_PI = 2.0 / math.pi


class InvertibleBlock(nn.Module):
    """Base class: ``forward(x, rev=False) -> (y, log_det)`` with the convention above."""

    min_dim = 1

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or dim < self.min_dim:
            raise ValueError(f"{type(self).__name__}: dim must be an int >= {self.min_dim}, got {dim!r}")
        self.dim = dim

    def check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}: expected input of shape (B, {self.dim}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


def soft_clamp(s: Tensor, clamp: float, kind: str = "atan") -> Tensor:
    """Smoothly squash log-scales into (-clamp, clamp): ``clamp * 2/pi * atan(s / clamp)`` (``atan``,
    as FrEIA) or ``clamp * tanh(s / clamp)`` (``tanh``: vectorised in ONNX Runtime, atan is not)."""
    if kind == "tanh":
        return clamp * torch.tanh(s / clamp)
    if kind != "atan":
        raise ValueError(f"soft_clamp: kind must be atan or tanh, got {kind!r}")
    return clamp * _TWO_OVER_PI * torch.atan(s / clamp)


def subnet(dim_in: int, dim_out: int, hidden: int) -> nn.Sequential:
    """The coupling sub-network: Linear -> ReLU -> Linear; the last layer starts at zero
    so that every coupling block starts as the identity."""
    net = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class AffineCoupling(InvertibleBlock):
    """GLOW / RealNVP affine coupling on both halves (as FrEIA's GLOWCouplingBlock, used by DifferNet).

    ``x = [x1, x2]`` (``d1 = dim // 2``)::

        y1 = x1 * exp(s2(x2)) + t2(x2)
        y2 = x2 * exp(s1(y1)) + t1(y1)
        log_det = sum(s2) + sum(s1)

    with log-scales soft-clamped to (-clamp, clamp) (:func:`soft_clamp`).
    """

    min_dim = 2

    def __init__(self, dim: int, hidden: int = 512, clamp: float = 2.0):
        super().__init__(dim)
        if hidden < 1:
            raise ValueError(f"AffineCoupling: hidden must be >= 1, got {hidden}")
        if not clamp > 0:
            raise ValueError(f"AffineCoupling: clamp must be > 0, got {clamp}")
        self.d1, self.d2 = dim // 2, dim - dim // 2
        self.clamp = float(clamp)
        self.net1 = subnet(self.d1, 2 * self.d2, hidden)   # y1 -> (s1, t1) for x2
        self.net2 = subnet(self.d2, 2 * self.d1, hidden)   # x2 -> (s2, t2) for x1

    def _st(self, net: nn.Module, cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = net(cond).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        self.check(x)
        a, b = x[:, :self.d1], x[:, self.d1:]
        if not rev:
            s2, t2 = self._st(self.net2, b)
            y1 = a * torch.exp(s2) + t2
            s1, t1 = self._st(self.net1, y1)
            y2 = b * torch.exp(s1) + t1
            return torch.cat([y1, y2], dim=1), s2.sum(dim=1) + s1.sum(dim=1)
        s1, t1 = self._st(self.net1, a)
        x2 = (b - t1) * torch.exp(-s1)
        s2, t2 = self._st(self.net2, x2)
        x1 = (a - t2) * torch.exp(-s2)
        return torch.cat([x1, x2], dim=1), -(s1.sum(dim=1) + s2.sum(dim=1))


class FixedPermutation(InvertibleBlock):
    """A random but fixed (seeded) permutation of the features; log_det = 0."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim)
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(dim, generator=g)
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        self.check(x)
        idx = self.inv if rev else self.perm
        return x[:, idx], x.new_zeros(x.shape[0])


class Standardize(InvertibleBlock):
    """Fixed affine standardisation ``y = (x - mean) / std`` (stats from the training features).

    Its log-det ``-sum(log std)`` is the same for every sample but is kept, so the model's
    NLL is the density of the raw features (no term dropped).
    """

    def __init__(self, dim: int, mean: Tensor | None = None, std: Tensor | None = None):
        super().__init__(dim)
        mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != dim or std.numel() != dim:
            raise ValueError(f"Standardize: mean/std must have {dim} values, got {mean.numel()}/{std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError("Standardize: std must be > 0 everywhere")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        self.check(x)
        ld = -torch.log(self.std).sum().expand(x.shape[0])
        if not rev:
            return (x - self.mean) / self.std, ld
        return x * self.std + self.mean, -ld
