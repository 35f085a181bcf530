"""Fully convolutional density model on backbone feature maps (FastFlow / CS-Flow / UFlow family).

One independent model per *group* of feature levels. A group is one level, or several levels
concatenated on the grid of the finest of them (PatchCore's patch features: each position then
sees its stride-8 detail and its stride-16 context); with ``local_average`` k > 1 every level is
first averaged over each position's k x k neighbourhood (reflected at the borders). This
preparation (:class:`PatchGroups`) is part of the model, so the ONNX export and the scorer share
it. Each group's model maps its map ``(N, C, h, w)`` to a latent map of the same shape, position by
position towards N(0, I) in the channels::

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
>>> m = ConvFlow.for_inputs([8, 16], groups=((0, 1),), local_average=3, n_blocks=2)   # one group, 24 channels
>>> [t.shape for t in m.log_likelihood_maps([torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)])]
[torch.Size([2, 6, 6])]

Named "density", never "flow" in module names: Prefect owns that word in this project.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    ``b' = b * exp(s(a)) + t(a)``, ``a`` unchanged; ``s`` soft-clamped to (-clamp, clamp). With
    ``cond_channels`` the subnet also sees a conditioning map ``cond`` (``s(a, cond)``, ``t(a, cond)``).
    Subnet ``dense``: Conv(k) -> ReLU -> Conv(k); ``separable``: Conv(1) -> depthwise Conv(k) ->
    ReLU -> Conv(1) (the same k x k context at about the cost of 1 x 1 kernels). The last conv
    is zero-initialised (identity at start). ``clamp_kind``: :func:`soft_clamp`'s atan or tanh."""

    def __init__(self, channels: int, hidden: int, kernel: int = 3, clamp: float = 2.0, subnet: str = "dense",
                 clamp_kind: str = "atan", cond_channels: int = 0):
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
        self.cond_channels = int(cond_channels)
        c_in = self.c1 + self.cond_channels
        if subnet == "dense":
            self.net = nn.Sequential(nn.Conv2d(c_in, hidden, kernel, padding=pad), nn.ReLU(),
                                     nn.Conv2d(hidden, 2 * self.c2, kernel, padding=pad))
        elif subnet == "separable":
            spatial = [nn.Conv2d(hidden, hidden, kernel, padding=pad, groups=hidden)] if kernel > 1 else []
            self.net = nn.Sequential(nn.Conv2d(c_in, hidden, 1), *spatial, nn.ReLU(),
                                     nn.Conv2d(hidden, 2 * self.c2, 1))
        else:
            raise ValueError(f"ConvCoupling: subnet must be dense or separable, got {subnet!r}")
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, rev: bool = False, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = x[:, :self.c1], x[:, self.c1:]
        st = self.net(a if cond is None else torch.cat([a, cond], dim=1))
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
                 subnet: str = "dense", clamp_kind: str = "atan", cond_channels: int = 0):
        super().__init__()
        self.channels = int(channels)
        blocks: list[nn.Module] = [Standardize2d(channels)]
        for i in range(n_blocks):
            blocks.append(ConvCoupling(channels, hidden, kernels[i % len(kernels)], clamp, subnet, clamp_kind,
                                       cond_channels))
            blocks.append(ChannelPermutation(channels, seed=seed * 1000 + i))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, rev: bool = False, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros_like(x[:, 0])
        for block in (reversed(self.blocks) if rev else self.blocks):
            x, ld = block(x, rev=rev, cond=cond) if isinstance(block, ConvCoupling) else block(x, rev=rev)
            log_det = log_det + ld
        return x, log_det

    def log_likelihood_map(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p per position (given ``cond`` when the couplings take one), nats, every term: ``(N, h, w)``."""
        z, log_det = self(x, cond=cond)
        return -0.5 * (z ** 2).sum(dim=1) - 0.5 * self.channels * _LOG_2PI + log_det


# ------------------------------------------------------------------ model
@dataclass(frozen=True)
class ConvFlowConfig:
    """Everything needed to rebuild a :class:`ConvFlow` (plain types: saved next to the state).
    ``channels``: per group; ``in_channels``: per input level; ``groups``: input positions per group
    (files written before groups: one group per input, no local average). ``merge_mode``: how a group of
    several levels is modelled (:mod:`defectflow.density.conv_groups`)."""

    channels: tuple[int, ...]
    n_blocks: int = 8
    hidden_ratio: float = 1.0
    kernels: tuple[int, ...] = (3, 1)
    clamp: float = 2.0
    seed: int = 0
    subnet: str = "dense"
    clamp_kind: str = "atan"          # files written before the option: atan
    in_channels: Optional[tuple[int, ...]] = None
    groups: Optional[tuple[tuple[int, ...], ...]] = None
    local_average: int = 1
    merge_mode: str = "concat"        # groups of several levels: concat | context (conv_groups.py)
    context_channels: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["kernels"] = list(self.channels), list(self.kernels)
        d["in_channels"] = list(self.inputs)
        d["groups"] = [list(g) for g in self.group_inputs]
        return d

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.in_channels if self.in_channels is not None else self.channels

    @property
    def group_inputs(self) -> tuple[tuple[int, ...], ...]:
        return self.groups if self.groups is not None else tuple((i,) for i in range(len(self.channels)))

    @classmethod
    def from_dict(cls, d: dict) -> "ConvFlowConfig":
        d = dict(d)
        d["channels"] = tuple(int(c) for c in d["channels"])
        d["kernels"] = tuple(int(k) for k in d.get("kernels", (3, 1)))
        if d.get("in_channels") is not None:
            d["in_channels"] = tuple(int(c) for c in d["in_channels"])
        if d.get("groups") is not None:
            d["groups"] = tuple(tuple(int(i) for i in g) for g in d["groups"])
        return cls(**d)


class ConvFlow(nn.Module):
    """:class:`~defectflow.density.conv_groups.PatchGroups` (the local average), then one model per group
    (:mod:`defectflow.density.conv_groups`). ``forward(level maps) -> [log p map (N, h, w)] per group``
    (nats per position, every term, on the group's finest grid): the ONNX-exportable scorer.
    ``channels`` are the groups' (every channel of their levels)."""

    def __init__(self, channels: Sequence[int], n_blocks: int = 8, hidden_ratio: float = 1.0,
                 clamp: float = 2.0, seed: int = 0, kernels: Sequence[int] = (3, 1), subnet: str = "dense",
                 clamp_kind: str = "atan", in_channels: Sequence[int] | None = None,
                 groups: Sequence[Sequence[int]] | None = None, local_average: int = 1,
                 merge_mode: str = "concat", context_channels: int = 64):
        super().__init__()
        from defectflow.density.conv_groups import MERGE_MODES, ConcatGroup, ContextGroup, PatchGroups

        if not channels:
            raise ValueError("ConvFlow: channels must name at least one feature level")
        if n_blocks < 1:
            raise ValueError(f"ConvFlow: n_blocks must be >= 1, got {n_blocks}")
        if not hidden_ratio > 0:
            raise ValueError(f"ConvFlow: hidden_ratio must be > 0, got {hidden_ratio}")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"ConvFlow: merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        self.config = ConvFlowConfig(tuple(int(c) for c in channels), int(n_blocks), float(hidden_ratio),
                                     tuple(int(k) for k in kernels), float(clamp), int(seed), str(subnet),
                                     str(clamp_kind), None if in_channels is None else tuple(int(c) for c in in_channels),
                                     None if groups is None else tuple(tuple(int(i) for i in g) for g in groups),
                                     int(local_average), str(merge_mode), int(context_channels))
        cfg = self.config
        if len(cfg.group_inputs) != len(cfg.channels) or any(
                sum(cfg.inputs[i] for i in g) != c for g, c in zip(cfg.group_inputs, cfg.channels)):
            raise ValueError(f"ConvFlow: groups {cfg.group_inputs} of inputs {cfg.inputs} do not give "
                             f"channels {cfg.channels}")
        if merge_mode == "context" and any(len(g) > 2 for g in cfg.group_inputs):
            raise ValueError("ConvFlow: merge_mode context takes groups of at most two levels (fine, coarse)")
        self.prepare = PatchGroups(cfg.group_inputs, cfg.local_average)

        def flow(c: int, k: int, cond: int = 0) -> LevelFlow:
            return (ConcatGroup if not cond else LevelFlow)(
                c, n_blocks, max(2, int(round(hidden_ratio * c))), cfg.kernels, clamp, seed * 100 + k, subnet,
                clamp_kind, cond)

        models = []
        for k, (g, c) in enumerate(zip(cfg.group_inputs, cfg.channels)):
            if merge_mode == "context" and len(g) == 2:
                fine, coarse = (cfg.inputs[i] for i in g)
                models.append(ContextGroup(flow(fine, k, cfg.context_channels), flow(coarse, 50 + k),
                                           cfg.context_channels))
            else:
                models.append(flow(c, k))
        self.levels = nn.ModuleList(models)

    @classmethod
    def for_inputs(cls, in_channels: Sequence[int], groups: Sequence[Sequence[int]] | None = None,
                   local_average: int = 1, **kw) -> "ConvFlow":
        """A model for level maps of ``in_channels``; ``groups`` (input positions) default to one per input."""
        groups = [tuple(g) for g in groups] if groups is not None else [(i,) for i in range(len(in_channels))]
        return cls([sum(in_channels[i] for i in g) for g in groups], in_channels=in_channels, groups=groups,
                   local_average=local_average, **kw)

    @classmethod
    def from_config(cls, cfg: ConvFlowConfig | dict) -> "ConvFlow":
        cfg = cfg if isinstance(cfg, ConvFlowConfig) else ConvFlowConfig.from_dict(cfg)
        return cls(cfg.channels, cfg.n_blocks, cfg.hidden_ratio, cfg.clamp, cfg.seed, cfg.kernels, cfg.subnet,
                   cfg.clamp_kind, cfg.in_channels, cfg.groups, cfg.local_average, cfg.merge_mode,
                   cfg.context_channels)

    @property
    def channels(self) -> tuple[int, ...]:
        return self.config.channels

    def _check(self, maps: Sequence[Tensor]) -> None:
        ins = self.config.inputs
        if len(maps) != len(ins):
            raise ValueError(f"ConvFlow: expected {len(ins)} feature maps, got {len(maps)}")
        for i, (m, c) in enumerate(zip(maps, ins)):
            if m.dim() != 4 or m.shape[1] != c:
                raise ValueError(f"ConvFlow: level {i} expects (N, {c}, h, w), got {tuple(m.shape)}")

    def fit_stats(self, prepared: Sequence[Sequence[Tensor]]) -> None:
        """Set every group's standardisation from its prepared training maps (:meth:`prepare`)."""
        for group, parts in zip(self.levels, prepared):
            group.fit_stats(parts)

    def set_stats(self, means: Sequence, stds: Sequence) -> None:
        """Per-channel mean / std of each group's (concatenated) input."""
        for level, m, s in zip(self.levels, means, stds):
            level.blocks[0].set_stats(m, s)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [group.group_log_likelihood(parts) for group, parts in zip(self.levels, self.prepare(maps))]

    def log_likelihood_maps(self, maps: Sequence[Tensor | np.ndarray], batch_size: int = 32) -> list[Tensor]:
        """log p per position per group, ``[(N, h_g, w_g)]`` (nats, every term), in eval mode, no grad."""
        maps = [torch.as_tensor(np.asarray(m, np.float32)) if not isinstance(m, Tensor) else m for m in maps]
        self._check(maps)
        n = maps[0].shape[0]
        was = self.training
        self.eval()
        with torch.no_grad():
            parts = [self([m[i:i + batch_size] for m in maps]) for i in range(0, n, batch_size)]
        self.train(was)
        if not parts:
            first = [maps[g[0]] for g in self.config.group_inputs]
            return [m.new_zeros((0,) + tuple(m.shape[2:])) for m in first]
        return [torch.cat([p[k] for p in parts]) for k in range(len(self.channels))]

    def nll_per_dim_maps(self, maps, batch_size: int = 32) -> list[Tensor]:
        """``-log p / C`` per position per group (nats per channel): the anomaly-map unit."""
        return [-ll / c for ll, c in zip(self.log_likelihood_maps(maps, batch_size), self.channels)]

    def inverse(self, zs: Sequence[Tensor]) -> list[Tensor]:
        """Latent maps -> the groups' (concatenated) prepared maps; concat groups only."""
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
    """Export ``model`` (inputs ``map0..`` per level, outputs ``loglik0..`` per group: ``(N, h, w)``) with the
    legacy exporter; batch and spatial sizes are dynamic, ``sizes`` (per level) only shape the dummy inputs."""
    import warnings

    model = model.eval()
    dummy = [torch.rand(1, c, h, w) for c, (h, w) in zip(model.config.inputs, sizes)]
    ins = [f"map{i}" for i in range(len(dummy))]
    outs = [f"loglik{i}" for i in range(len(model.channels))]
    first = [g[0] for g in model.config.group_inputs]
    axes = {**{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(ins)},
            **{n: {0: "batch", 1: f"h{first[i]}", 2: f"w{first[i]}"} for i, n in enumerate(outs)}}

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


