"""Adaptive discriminator augmentation (Karras et al. 2020, "Training generative adversarial networks
with limited data").

:func:`augment` applies, each with probability ``p`` per image, x-flip, a 90-degree rotation, an
integer translation (up to 1/8 of the size, reflect padded), and brightness, contrast, saturation
and hue changes; every operation is differentiable in the image, so the generator learns through it.
:class:`AdaController` tunes ``p`` from the overfitting heuristic r_t = E[sign(D(real))]: p rises
when r_t is above the target (0.6) and falls when below, by at most ``batch * interval / (ada_kimg *
1000)`` per adjustment, so p can go from 0 to 1 in ``ada_kimg`` thousand real images.

>>> x = torch.zeros(2, 3, 8, 8)
>>> augment(x, 0.5, torch.Generator().manual_seed(0)).shape
torch.Size([2, 3, 8, 8])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = torch.tensor([0.299, 0.587, 0.114])


def _chance(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def _flip_rotate(x, p, g):
    n = x.shape[0]
    flip = _chance(n, p, g, x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    k = torch.randint(0, 4, (n,), generator=g, device=x.device) * _chance(n, p, g, x.device)
    out = x
    for turn in (1, 2, 3):
        out = torch.where((k == turn).view(-1, 1, 1, 1), torch.rot90(x, turn, (2, 3)), out)
    return out


def _translate(x, p, g):
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    shift = torch.randint(-pad, pad + 1, (n, 2), generator=g, device=x.device)
    shift = shift * _chance(n, p, g, x.device)[:, None]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = (torch.arange(h, device=x.device)[None] + pad - shift[:, :1])     # (N, H)
    cols = (torch.arange(w, device=x.device)[None] + pad - shift[:, 1:])     # (N, W)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _color_matrices(n, p, g, device):
    """Per-image 4 x 4 colour transforms (brightness, contrast, saturation, hue), identity where not drawn."""
    eye = torch.eye(4, device=device).repeat(n, 1, 1)

    def translate(t):
        m = eye.clone()
        m[:, :3, 3] = t[:, None]
        return m

    def scale(s):
        m = eye.clone()
        m[:, 0, 0] = m[:, 1, 1] = m[:, 2, 2] = s
        return m

    m = eye
    b = torch.randn(n, generator=g, device=device) * 0.2 * _chance(n, p, g, device)
    m = translate(b) @ m
    c = torch.exp2(torch.randn(n, generator=g, device=device) * 0.5 * _chance(n, p, g, device))
    m = scale(c) @ m
    axis = torch.full((3,), 1 / math.sqrt(3), device=device)        # the luma axis of the hue rotation
    theta = (torch.rand(n, generator=g, device=device) * 2 - 1) * math.pi * _chance(n, p, g, device)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    outer = torch.outer(axis, axis)
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], device=device)
    rot = eye.clone()
    rot[:, :3, :3] = outer + cos * (torch.eye(3, device=device) - outer) + sin * cross
    m = rot @ m
    s = torch.exp2(torch.randn(n, generator=g, device=device) * 1.0 * _chance(n, p, g, device))
    sat = eye.clone()
    sat[:, :3, :3] = outer + (torch.eye(3, device=device) - outer) * s[:, None, None]
    return sat @ m


def augment(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Augment a batch ``(N, 3, H, W)`` in [-1, 1] (square), each transform drawn with probability ``p``."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"augment expects (N, 3, S, S) images, got {tuple(x.shape)}")
    if p <= 0:
        return x
    x = _translate(_flip_rotate(x, p, g), p, g)
    m = _color_matrices(x.shape[0], p, g, x.device).to(x.dtype)
    n, c, h, w = x.shape
    flat = torch.cat([x.reshape(n, 3, -1), torch.ones(n, 1, h * w, device=x.device, dtype=x.dtype)], 1)
    return (m[:, :3] @ flat).reshape(n, c, h, w)


class AdaController:
    """Tunes the augmentation probability ``p`` toward ``target`` of E[sign(D(real))]."""

    def __init__(self, target: float = 0.6, ada_kimg: float = 20.0, interval: int = 4, p: float = 0.0):
        self.target, self.ada_kimg, self.interval, self.p = target, ada_kimg, interval, float(p)
        self._signs: list[float] = []
        self._count = 0

    def observe(self, real_logits: torch.Tensor) -> None:
        """Record the sign of D's outputs on (augmented) reals of one step; adjusts ``p`` every ``interval``."""
        self._signs.append(float(torch.sign(real_logits.detach()).sum()))
        self._count += int(real_logits.numel())
        if len(self._signs) >= self.interval:
            rt = sum(self._signs) / self._count
            step = self._count / (self.ada_kimg * 1000)
            self.p = float(min(1.0, max(0.0, self.p + math.copysign(step, rt - self.target))))
            self.last_rt = rt
            self._signs, self._count = [], 0

    def state_dict(self) -> dict:
        return {"p": self.p, "signs": list(self._signs), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self.p, self._signs, self._count = float(state["p"]), list(state["signs"]), int(state["count"])
