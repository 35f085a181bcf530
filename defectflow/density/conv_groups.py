"""What one group of backbone levels looks like to the convolutional density model.

A group is one level, or several levels a position sees together (its stride-8 detail and its
stride-16 context: PatchCore's patch features). :class:`PatchGroups` first averages every level over
each position's ``local_average`` x ``local_average`` neighbourhood (reflected at the borders); then
each group's model gives one log-likelihood map on the grid of the group's first (finest) level:

- :class:`ConcatGroup` (``merge_mode: concat``): the levels resized to the finest grid and
  concatenated; one :class:`~defectflow.density.conv.LevelFlow` on all channels.
- :class:`ContextGroup` (``merge_mode: context``): the same joint density, factorised as
  ``p(fine | context(coarse)) * p(coarse)``: a flow on the coarse level at its own resolution, and a
  flow on the fine level whose couplings also see a learnt ``context_channels`` projection of the
  coarse level, upsampled. The joint log-likelihood map (the coarse term upsampled) equals the
  concatenated model's in what it measures, at about 40 % of its cost: the concatenated model
  repeats each coarse cell on the four fine positions it covers.

Both give ``log p`` of the position's every channel (fine + coarse), so maps compare per channel.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectflow.density.conv import LevelFlow, Standardize2d

MERGE_MODES = ("concat", "context")


def smooth(x: Tensor, k: int) -> Tensor:
    """``k`` x ``k`` average over each position's neighbourhood, reflected at the borders (k odd)."""
    if k == 1:
        return x
    p = k // 2
    if min(x.shape[2], x.shape[3]) > p:
        return F.avg_pool2d(F.pad(x, (p, p, p, p), mode="reflect"), k, stride=1)
    return F.avg_pool2d(x, k, stride=1, padding=p, count_include_pad=False)


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    return x if x.shape[2:] == ref.shape[2:] else F.interpolate(x, size=ref.shape[2:], mode="bilinear",
                                                                  align_corners=False)


class PatchGroups(nn.Module):
    """Level maps -> per group, the list of its levels' maps after the local average."""

    def __init__(self, groups: Sequence[Sequence[int]], local_average: int = 1):
        super().__init__()
        self.groups = tuple(tuple(int(i) for i in g) for g in groups)
        self.local_average = int(local_average)
        if self.local_average < 1 or self.local_average % 2 == 0:
            raise ValueError(f"PatchGroups: local_average must be odd and >= 1, got {local_average}")

    def forward(self, maps: Sequence[Tensor]) -> list[list[Tensor]]:
        return [[smooth(maps[i], self.local_average) for i in g] for g in self.groups]


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from defectflow.density.conv_fit import channel_stats
    return channel_stats(x)


class ConcatGroup(LevelFlow):
    """The group's levels on the finest grid, concatenated, under one level flow (the state of a
    one-level group is a plain :class:`LevelFlow`'s: files from before groups load as they are)."""

    @staticmethod
    def combine(parts: Sequence[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat([parts[0]] + [resize_to(p, parts[0]) for p in parts[1:]], 1)

    def fit_stats(self, parts: Sequence[Tensor]) -> None:
        self.blocks[0].set_stats(*_stats(self.combine(parts).numpy()))

    def group_log_likelihood(self, parts: Sequence[Tensor]) -> Tensor:
        return self.log_likelihood_map(self.combine(parts))


class ContextGroup(nn.Module):
    """``p(fine | context(coarse)) p(coarse)`` (see the module docstring); two levels."""

    def __init__(self, fine: LevelFlow, coarse: LevelFlow, context_channels: int):
        super().__init__()
        if fine.blocks[1].cond_channels != context_channels:
            raise ValueError(f"ContextGroup: the fine flow's couplings take {fine.blocks[1].cond_channels} "
                             f"conditioning channels, not {context_channels}")
        self.fine, self.coarse = fine, coarse
        self.context_std = Standardize2d(coarse.channels)
        self.context = nn.Sequential(nn.Conv2d(coarse.channels, context_channels, 1), nn.ReLU())
        self.channels = fine.channels + coarse.channels

    def fit_stats(self, parts: Sequence[Tensor]) -> None:
        fine_stats, coarse_stats = _stats(parts[0].numpy()), _stats(parts[1].numpy())
        self.fine.blocks[0].set_stats(*fine_stats)
        self.coarse.blocks[0].set_stats(*coarse_stats)
        self.context_std.set_stats(*coarse_stats)

    def group_log_likelihood(self, parts: Sequence[Tensor]) -> Tensor:
        fine, coarse = parts
        cond = resize_to(self.context(self.context_std(coarse)[0]), fine)
        ll_coarse = self.coarse.log_likelihood_map(coarse)
        return self.fine.log_likelihood_map(fine, cond) + resize_to(ll_coarse[:, None], fine)[:, 0]
