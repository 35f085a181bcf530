"""Fully convolutional density model on backbone feature maps (FastFlow / CS-Flow / UFlow family).

One independent model per feature level. Each maps a feature map ``(N, C, h, w)`` to a latent map
of the same shape, position by position towards N(0, I) in the channels::

    Standardize2d (per-channel train mean/std, log-det kept)
    -> [ConvCoupling (k x k conv subnets, dense or separable, kernels alternating) -> ChannelPermutation] * n_blocks

Sign convention as in :mod:`defectflow.density.blocks`: a block maps data -> latent and returns
``log |det dy/dx|``, but here as a **map** ``(N, h, w)``. The Jacobian of a coupling is
triangular, so its log-det is the sum of the log-scales ``s[c, p]``; giving each position ``p``
the sum over its channels splits the image's log-det exactly into per-position terms. The
log-likelihood per position (nats, every term)::

    log p(x)[p] = -0.5 * ||z[:, p]||^2 - 0.5 * C * log(2 pi) + log_det[p]

and summing it over positions gives the exact log-likelihood of the whole map. Maps are
compared across levels *per channel* (``/ C``: nats per dimension). Higher NLL = more anomalous.

>>> m = ConvFlow([8, 16], n_blocks=2, hidden_ratio=1.0, seed=0)
>>> [t.shape for t in m.log_likelihood_maps([torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)])]
[torch.Size([2, 6, 6]), torch.Size([2, 3, 3])]

Named "density", never "flow" in module names: Prefect owns that word in this project.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from defectflow.density.blocks import soft_clamp
from defectflow.errors import DefectflowError
from defectflow.stage import logger

_LOG_2PI = math.log(2.0 * math.pi)
FORMAT = 1
log = logger("density.conv")


class ConvFitError(DefectflowError):
    """The convolutional density model could not be trained or loaded."""


# ------------------------------------------------------------------ blocks
class Standardize2d(nn.Module):
    """``y = (x - mean[c]) / std[c]``; log-det map ``-sum_c log std[c]`` at every position."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.channels or std.numel() != self.channels:
            raise ValueError(f"Standardize2d: need {self.channels} means/stds, got {mean.numel()}/{std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError("Standardize2d: std must be > 0 everywhere")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        m, s = self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1)
        ld = (-torch.log(self.std).sum()) * torch.ones_like(x[:, 0])
        if not rev:
            return (x - m) / s, ld
        return x * s + m, -ld


class ConvCoupling(nn.Module):
    """Affine coupling with a conv subnet (FastFlow): ``x = [a, b]`` split on channels,
    ``b' = b * exp(s(a)) + t(a)``, ``a`` unchanged; ``s`` soft-clamped to (-clamp, clamp).
    Subnet ``dense``: Conv(k) -> ReLU -> Conv(k); ``separable``: Conv(1) -> depthwise Conv(k) ->
    ReLU -> Conv(1) (the same k x k context at about the cost of 1 x 1 kernels). The last conv
    is zero-initialised (identity at start). ``clamp_kind``: :func:`soft_clamp`'s atan or tanh."""

    def __init__(self, channels: int, hidden: int, kernel: int = 3, clamp: float = 2.0, subnet: str = "dense",
                 clamp_kind: str = "atan"):
        super().__init__()
        if channels < 2:
            raise ValueError(f"ConvCoupling: channels must be >= 2, got {channels}")
        if kernel % 2 != 1:
            raise ValueError(f"ConvCoupling: kernel must be odd, got {kernel}")
        if not clamp > 0:
            raise ValueError(f"ConvCoupling: clamp must be > 0, got {clamp}")
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.clamp = float(clamp)
        self.clamp_kind = str(clamp_kind)
        soft_clamp(torch.zeros(1), 1.0, self.clamp_kind)        # rejects an unknown kind here
        pad = kernel // 2
        if subnet == "dense":
            self.net = nn.Sequential(nn.Conv2d(self.c1, hidden, kernel, padding=pad), nn.ReLU(),
                                     nn.Conv2d(hidden, 2 * self.c2, kernel, padding=pad))
        elif subnet == "separable":
            spatial = [nn.Conv2d(hidden, hidden, kernel, padding=pad, groups=hidden)] if kernel > 1 else []
            self.net = nn.Sequential(nn.Conv2d(self.c1, hidden, 1), *spatial, nn.ReLU(),
                                     nn.Conv2d(hidden, 2 * self.c2, 1))
        else:
            raise ValueError(f"ConvCoupling: subnet must be dense or separable, got {subnet!r}")
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        a, b = x[:, :self.c1], x[:, self.c1:]
        st = self.net(a)
        s, t = soft_clamp(st[:, :self.c2], self.clamp, self.clamp_kind), st[:, self.c2:]
        if not rev:
            return torch.cat([a, b * torch.exp(s) + t], dim=1), s.sum(dim=1)
        return torch.cat([a, (b - t) * torch.exp(-s)], dim=1), -s.sum(dim=1)


class ChannelPermutation(nn.Module):
    """A fixed, seeded permutation of the channels; log-det 0."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(int(seed)))
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        return x.index_select(1, self.inv if rev else self.perm), torch.zeros_like(x[:, 0])


class LevelFlow(nn.Module):
    """The density model of one feature level (C channels, any h x w)."""

    def __init__(self, channels: int, n_blocks: int, hidden: int, kernels: Sequence[int], clamp: float, seed: int,
                 subnet: str = "dense", clamp_kind: str = "atan"):
        super().__init__()
        self.channels = int(channels)
        blocks: list[nn.Module] = [Standardize2d(channels)]
        for i in range(n_blocks):
            blocks.append(ConvCoupling(channels, hidden, kernels[i % len(kernels)], clamp, subnet, clamp_kind))
            blocks.append(ChannelPermutation(channels, seed=seed * 1000 + i))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros_like(x[:, 0])
        for block in (reversed(self.blocks) if rev else self.blocks):
            x, ld = block(x, rev=rev)
            log_det = log_det + ld
        return x, log_det

    def log_likelihood_map(self, x: Tensor) -> Tensor:
        """log p per position, nats, every term: ``(N, h, w)``."""
        z, log_det = self(x)
        return -0.5 * (z ** 2).sum(dim=1) - 0.5 * self.channels * _LOG_2PI + log_det


# ------------------------------------------------------------------ model
@dataclass(frozen=True)
class ConvFlowConfig:
    """Everything needed to rebuild a :class:`ConvFlow` (plain types: saved next to the state)."""

    channels: tuple[int, ...]
    n_blocks: int = 8
    hidden_ratio: float = 1.0
    kernels: tuple[int, ...] = (3, 1)
    clamp: float = 2.0
    seed: int = 0
    subnet: str = "dense"
    clamp_kind: str = "atan"          # files written before the option: atan

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["kernels"] = list(self.channels), list(self.kernels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConvFlowConfig":
        d = dict(d)
        d["channels"] = tuple(int(c) for c in d["channels"])
        d["kernels"] = tuple(int(k) for k in d.get("kernels", (3, 1)))
        return cls(**d)


class ConvFlow(nn.Module):
    """One :class:`LevelFlow` per feature level. ``forward(maps) -> [log p map (N, h, w)] per level``
    (nats per position, every term): the ONNX-exportable scorer."""

    def __init__(self, channels: Sequence[int], n_blocks: int = 8, hidden_ratio: float = 1.0,
                 clamp: float = 2.0, seed: int = 0, kernels: Sequence[int] = (3, 1), subnet: str = "dense",
                 clamp_kind: str = "atan"):
        super().__init__()
        if not channels:
            raise ValueError("ConvFlow: channels must name at least one feature level")
        if n_blocks < 1:
            raise ValueError(f"ConvFlow: n_blocks must be >= 1, got {n_blocks}")
        if not hidden_ratio > 0:
            raise ValueError(f"ConvFlow: hidden_ratio must be > 0, got {hidden_ratio}")
        self.config = ConvFlowConfig(tuple(int(c) for c in channels), int(n_blocks), float(hidden_ratio),
                                     tuple(int(k) for k in kernels), float(clamp), int(seed), str(subnet),
                                     str(clamp_kind))
        self.levels = nn.ModuleList(
            LevelFlow(c, n_blocks, max(2, int(round(hidden_ratio * c))), self.config.kernels, clamp, seed * 100 + i,
                      subnet, clamp_kind) for i, c in enumerate(self.config.channels))

    @classmethod
    def from_config(cls, cfg: ConvFlowConfig | dict) -> "ConvFlow":
        cfg = cfg if isinstance(cfg, ConvFlowConfig) else ConvFlowConfig.from_dict(cfg)
        return cls(cfg.channels, cfg.n_blocks, cfg.hidden_ratio, cfg.clamp, cfg.seed, cfg.kernels, cfg.subnet,
                   cfg.clamp_kind)

    @property
    def channels(self) -> tuple[int, ...]:
        return self.config.channels

    def _check(self, maps: Sequence[Tensor]) -> None:
        if len(maps) != len(self.levels):
            raise ValueError(f"ConvFlow: expected {len(self.levels)} feature maps, got {len(maps)}")
        for i, (m, c) in enumerate(zip(maps, self.channels)):
            if m.dim() != 4 or m.shape[1] != c:
                raise ValueError(f"ConvFlow: level {i} expects (N, {c}, h, w), got {tuple(m.shape)}")

    def set_stats(self, means: Sequence, stds: Sequence) -> None:
        for level, m, s in zip(self.levels, means, stds):
            level.blocks[0].set_stats(m, s)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [level.log_likelihood_map(x) for level, x in zip(self.levels, maps)]

    def log_likelihood_maps(self, maps: Sequence[Tensor | np.ndarray], batch_size: int = 32) -> list[Tensor]:
        """log p per position per level, ``[(N, h_i, w_i)]`` (nats, every term), in eval mode, no grad."""
        maps = [torch.as_tensor(np.asarray(m, np.float32)) if not isinstance(m, Tensor) else m for m in maps]
        self._check(maps)
        n = maps[0].shape[0]
        was = self.training
        self.eval()
        with torch.no_grad():
            parts = [self([m[i:i + batch_size] for m in maps]) for i in range(0, n, batch_size)]
        self.train(was)
        if not parts:
            return [m.new_zeros((0,) + tuple(m.shape[2:])) for m in maps]
        return [torch.cat([p[k] for p in parts]) for k in range(len(maps))]

    def nll_per_dim_maps(self, maps, batch_size: int = 32) -> list[Tensor]:
        """``-log p / C`` per position per level (nats per channel): the anomaly-map unit."""
        return [-ll / c for ll, c in zip(self.log_likelihood_maps(maps, batch_size), self.channels)]

    def inverse(self, zs: Sequence[Tensor]) -> list[Tensor]:
        return [level(z, rev=True)[0] for level, z in zip(self.levels, zs)]

    # ---------------------------------------------------------------- persistence
    def to_payload(self, extra: dict | None = None) -> dict:
        """Plain dict (config + tensors): ``torch.save`` it; loads with ``weights_only=True``."""
        return {"format": FORMAT, "kind": "conv_density", "config": self.config.to_dict(),
                "state_dict": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "meta": dict(extra or {})}

    @classmethod
    def from_payload(cls, payload: dict) -> "ConvFlow":
        if not isinstance(payload, dict) or payload.get("kind") != "conv_density" or payload.get("format") != FORMAT:
            raise ConvFitError(f"not a conv density payload of format {FORMAT}")
        model = cls.from_config(payload["config"])
        model.load_state_dict(payload["state_dict"])
        return model.eval()


def save_conv_flow(path: str | Path, model: ConvFlow, extra: dict | None = None) -> Path:
    path = Path(path)
    torch.save(model.to_payload(extra), path)
    return path


def load_conv_flow(path: str | Path) -> tuple[ConvFlow, dict]:
    """(model in eval mode, meta) from a file written by :func:`save_conv_flow`; errors name the file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvFitError(f"{path}: not a readable conv density file: {err}") from None
    try:
        return ConvFlow.from_payload(payload), dict(payload.get("meta") or {})
    except (ConvFitError, KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ConvFitError(f"{path}: {err}") from None


def export_onnx(model: ConvFlow, path: str | Path, sizes: Sequence[tuple[int, int]], opset: int = 17) -> Path:
    """Export ``model`` (inputs ``map0..``, outputs ``loglik0..``: ``(N, h, w)``) with the legacy exporter;
    batch and spatial sizes are dynamic, ``sizes`` only shapes the dummy inputs."""
    import warnings

    model = model.eval()
    dummy = [torch.zeros(1, c, h, w) for c, (h, w) in zip(model.channels, sizes)]
    ins = [f"map{i}" for i in range(len(dummy))]
    outs = [f"loglik{i}" for i in range(len(dummy))]
    axes = {**{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(ins)},
            **{n: {0: "batch", 1: f"h{i}", 2: f"w{i}"} for i, n in enumerate(outs)}}

    class _Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *maps):
            return tuple(self.m(list(maps)))

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(model), tuple(dummy), str(path), dynamo=False, input_names=ins,
                          output_names=outs, dynamic_axes=axes, opset_version=opset)
    return Path(path)


# ------------------------------------------------------------------ training
@dataclass(frozen=True)
class ConvFitConfig:
    n_blocks: int = 4
    hidden_ratio: float = 1.0
    kernels: tuple[int, ...] = (3, 1)
    subnet: str = "dense"
    clamp: float = 2.0
    clamp_kind: str = "tanh"
    epochs: int = 8
    batch_size: int = 16          # images (each gives h * w positions)
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 10.0
    seed: int = 0
    threads: int = 2


@dataclass
class ConvFitResult:
    model: ConvFlow
    history: list[dict] = field(default_factory=list)   # {epoch, train_nll: [per level], val_nll: [..] | None}
    best_epoch: list[int] = field(default_factory=list)  # per level
    seconds: float = 0.0

    @property
    def best_val_nll(self) -> Optional[list[float]]:
        if not self.history or self.history[0]["val_nll"] is None:
            return None
        return [min(h["val_nll"][k] for h in self.history) for k in range(len(self.best_epoch))]


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean / std of ``(N, C, h, w)`` maps; near-constant channels get a floor."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    floor = 0.01 * float(std.mean()) + 1e-6
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def _as_maps(maps, what: str) -> list[Tensor]:
    out = []
    for i, m in enumerate(maps):
        a = np.asarray(m, np.float32)
        if a.ndim != 4:
            raise ConvFitError(f"{what} level {i}: expected maps of shape (N, C, h, w), got {a.shape}")
        if not np.isfinite(a).all():
            raise ConvFitError(f"{what} level {i}: feature maps contain NaN or inf")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    if len({len(m) for m in out}) != 1:
        raise ConvFitError(f"{what}: every level needs the same number of images, got {[len(m) for m in out]}")
    return out


def fit_conv_flow(train_maps: Sequence[np.ndarray], val_maps: Optional[Sequence[np.ndarray]] = None,
                  cfg: ConvFitConfig = ConvFitConfig(), progress: bool = False) -> ConvFitResult:
    """Train one conv density model per level on good ``train_maps`` ``[(N, C_i, h_i, w_i)]``.

    Loss per level: mean over images and positions of NLL per channel (all terms). When
    ``val_maps`` (good validation images only: the caller's duty) are given, each level keeps
    the epoch with its lowest validation NLL. Seeded: same inputs + seed -> same weights.
    """
    xs = _as_maps(train_maps, "train")
    if len(xs[0]) < 2:
        raise ConvFitError(f"need at least 2 good training images, got {len(xs[0])}")
    xv = _as_maps(val_maps, "val") if val_maps is not None and len(val_maps) and len(val_maps[0]) else None
    if xv is not None and [m.shape[1] for m in xv] != [m.shape[1] for m in xs]:
        raise ConvFitError("val maps have different channels from train maps")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = ConvFlow([m.shape[1] for m in xs], cfg.n_blocks, cfg.hidden_ratio, cfg.clamp, cfg.seed, cfg.kernels,
                         cfg.subnet, cfg.clamp_kind)
        stats = [channel_stats(m.numpy()) for m in xs]
        model.set_stats([s[0] for s in stats], [s[1] for s in stats])
        opts = [torch.optim.Adam(lv.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for lv in model.levels]
        n_lv = len(xs)
        result = ConvFitResult(model, best_epoch=[cfg.epochs] * n_lv)
        best = [math.inf] * n_lv
        best_state: list[Optional[dict]] = [None] * n_lv
        epochs = range(1, cfg.epochs + 1)
        if progress:
            from tqdm import tqdm
            epochs = tqdm(epochs, desc="conv density", unit="epoch", leave=False)
        n = len(xs[0])
        for epoch in epochs:
            model.train()
            order = torch.randperm(n, generator=gen)
            totals = [0.0] * n_lv
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                for k, (level, opt) in enumerate(zip(model.levels, opts)):
                    loss = -(level.log_likelihood_map(xs[k][idx]) / level.channels).mean()
                    if not torch.isfinite(loss):
                        raise ConvFitError(f"training diverged at epoch {epoch}, level {k} (loss {loss.item()}); "
                                           "lower the learning rate or the clamp")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(level.parameters(), cfg.grad_clip)
                    opt.step()
                    totals[k] += loss.item() * len(idx)
            val = None
            if xv is not None:
                val = [float(-(ll / c).mean()) for ll, c in zip(model.log_likelihood_maps(xv), model.channels)]
                for k in range(n_lv):
                    if val[k] < best[k]:
                        best[k], result.best_epoch[k] = val[k], epoch
                        best_state[k] = copy.deepcopy(model.levels[k].state_dict())
            result.history.append({"epoch": epoch, "train_nll": [t / n for t in totals], "val_nll": val})
            log.debug("epoch %d train %s val %s", epoch, result.history[-1]["train_nll"], val)
        for k, state in enumerate(best_state):
            if state is not None:
                model.levels[k].load_state_dict(state)
        model.eval()
    finally:
        torch.set_num_threads(threads)
    result.seconds = time.perf_counter() - t0
    return result
