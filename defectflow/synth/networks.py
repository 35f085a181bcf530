"""Compact StyleGAN2 networks (Karras et al. 2020, "Analyzing and improving the image quality of StyleGAN").

Generator: a mapping network ``z -> w`` and a synthesis network of modulated / demodulated 3 x 3
convolutions (one grouped convolution per layer: weights scaled per sample by the style, then
normalised), per-layer noise with a learnt strength, and skip-connected RGB outputs summed over
resolutions. Discriminator: residual blocks, minibatch standard deviation, a linear head.
All layers use the equalised learning rate (weights drawn N(0, 1), scaled by 1/sqrt(fan_in) at run time).

Simplifications against the paper, chosen for CPU throughput: bilinear up/down-sampling instead of
the FIR filters, no path-length regulariser. Images are ``(N, 3, S, S)`` in [-1, 1].

>>> g = Generator(NetConfig(size=16, z_dim=32, w_dim=32, channel_max=32))
>>> g(torch.randn(2, 32)).shape
torch.Size([2, 3, 16, 16])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Shapes shared by generator and discriminator; stored with every checkpoint."""

    size: int = 64
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 2
    channel_base: int = 4096   # channels at resolution r: min(channel_max, channel_base // r)
    channel_max: int = 128
    mbstd_group: int = 4

    def __post_init__(self):
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {self.size}")

    def channels(self, res: int) -> int:
        return max(8, min(self.channel_max, self.channel_base // res))

    @property
    def resolutions(self) -> list[int]:
        """4, 8, ..., size."""
        return [2 ** k for k in range(2, int(math.log2(self.size)) + 1)]

    def to_dict(self) -> dict:
        return asdict(self)


class EqLinear(nn.Module):
    """Linear layer with equalised learning rate (``lr_mul`` slows the mapping network)."""

    def __init__(self, n_in: int, n_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((n_out,), float(bias_init) / lr_mul))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(n_in), lr_mul, act

    def forward(self, x):
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.act else x


class EqConv(nn.Module):
    """Plain convolution with equalised learning rate (discriminator, skips)."""

    def __init__(self, c_in: int, c_out: int, k: int, *, act: bool = True, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.pad, self.act = 1 / math.sqrt(c_in * k * k), k // 2, act

    def forward(self, x):
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.act else x


class MappingNetwork(nn.Module):
    """``z -> w``: pixel-normalised z through ``layers`` leaky-ReLU layers (lr x 0.01); tracks mean w."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.net = nn.Sequential(*[EqLinear(a, b, lr_mul=0.01, act=True) for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z, *, psi: float = 1.0, track: float | None = None):
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        w = self.net(z)
        if track is not None:  # training: running mean of w (beta = track), the truncation centre
            self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, track))
        if psi != 1.0:
            w = self.w_avg.lerp(w, psi)
        return w


class ModulatedConv(nn.Module):
    """Modulated / demodulated convolution: input scaled by the style, a shared conv, output scaled by
    the demodulation coefficients (the same as scaling the weights per sample; on CPU a shared conv
    runs ~10x faster than the fused per-sample grouped conv)."""

    def __init__(self, c_in: int, c_out: int, k: int, w_dim: int, *, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.affine = EqLinear(w_dim, c_in, bias_init=1.0)
        self.scale, self.pad, self.demodulate = 1 / math.sqrt(c_in * k * k), k // 2, demodulate
        self.c_in, self.c_out, self.k = c_in, c_out, k

    def forward(self, x, w):
        style = self.affine(w)                                                # (N, C_in)
        weight = self.weight * self.scale
        x = F.conv2d(x * style[:, :, None, None], weight, padding=self.pad)
        if self.demodulate:                                                   # 1 / |w * s| per output channel
            d = torch.rsqrt((weight.square().sum((2, 3))[None] * style.square()[:, None]).sum(2) + 1e-8)
            x = x * d[:, :, None, None]
        return x


class StyleLayer(nn.Module):
    """Modulated 3 x 3 conv (optionally after a 2x upsample) + scaled noise + bias + leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, res: int, *, up: bool):
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.up, self.res = up, res

    def forward(self, x, w, noise=None):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x, w)
        if noise is None:
            noise = torch.randn(x.shape[0], 1, self.res, self.res, device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength + self.bias[None, :, None, None]
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


class ToRGB(nn.Module):
    """Modulated 1 x 1 conv to RGB, no demodulation (the skip outputs that are summed)."""

    def __init__(self, c_in: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(c_in, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias[None, :, None, None]


class SynthesisNetwork(nn.Module):
    """Learnt 4 x 4 constant -> two style layers per resolution up to ``size``, RGB skips summed."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        res = cfg.resolutions
        self.const = nn.Parameter(torch.randn(cfg.channels(4), 4, 4))
        layers, rgbs = [StyleLayer(cfg.channels(4), cfg.channels(4), cfg.w_dim, 4, up=False)], [
            ToRGB(cfg.channels(4), cfg.w_dim)]
        for r in res[1:]:
            layers += [StyleLayer(cfg.channels(r // 2), cfg.channels(r), cfg.w_dim, r, up=True),
                       StyleLayer(cfg.channels(r), cfg.channels(r), cfg.w_dim, r, up=False)]
            rgbs.append(ToRGB(cfg.channels(r), cfg.w_dim))
        self.layers, self.rgbs = nn.ModuleList(layers), nn.ModuleList(rgbs)
        self.num_ws = len(layers) + 1   # one w per style layer, the last RGB shares the last layer's

    def forward(self, ws, noise_generator: torch.Generator | None = None):
        """``ws``: (N, num_ws, w_dim). Noise from ``noise_generator`` when given (reproducible)."""
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        img = None
        li = 0
        for ri, rgb in enumerate(self.rgbs):
            for _ in range(1 if ri == 0 else 2):
                layer = self.layers[li]
                noise = None
                if noise_generator is not None:
                    noise = torch.randn(ws.shape[0], 1, layer.res, layer.res, generator=noise_generator,
                                        device=ws.device)
                x = layer(x, ws[:, li], noise)
                li += 1
            y = rgb(x, ws[:, li])
            img = y if img is None else F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + y
        return img


class Generator(nn.Module):
    """Mapping + synthesis; ``mix`` gives style mixing (a second w from a crossover layer on)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws

    def ws(self, z, *, psi: float = 1.0, track: float | None = None, z_mix=None, cutoff: int | None = None):
        """Per-layer styles ``(N, num_ws, w_dim)``; with ``z_mix``, layers from ``cutoff`` take its w."""
        w = self.mapping(z, psi=psi, track=track)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if z_mix is not None and cutoff is not None:
            ws[:, cutoff:] = self.mapping(z_mix, psi=psi)[:, None]
        return ws

    def forward(self, z, *, psi: float = 1.0, noise_generator: torch.Generator | None = None, **mix):
        return self.synthesis(self.ws(z, psi=psi, **mix), noise_generator)


class DiscriminatorBlock(nn.Module):
    """Two 3 x 3 convs then 2x downsample, plus a 1 x 1 downsampled skip; sum scaled by 1/sqrt(2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0, self.conv1 = EqConv(c_in, c_in, 3), EqConv(c_in, c_out, 3)
        self.skip = EqConv(c_in, c_out, 1, act=False, bias=False)

    def forward(self, x):
        y = F.avg_pool2d(self.skip(x), 2)
        x = F.avg_pool2d(self.conv1(self.conv0(x)), 2)
        return (x + y) * (1 / math.sqrt(2))


class Discriminator(nn.Module):
    """Residual discriminator: fromRGB -> blocks down to 4 x 4 -> minibatch std -> conv -> fc -> logit."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        res = cfg.resolutions[::-1]            # size, ..., 8, 4
        self.from_rgb = EqConv(3, cfg.channels(cfg.size), 1)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(cfg.channels(r), cfg.channels(r // 2)) for r in res[:-1]])
        c4 = cfg.channels(4)
        self.conv = EqConv(c4 + 1, c4, 3)
        self.fc = EqLinear(c4 * 16, c4, act=True)
        self.out = EqLinear(c4, 1)

    def minibatch_std(self, x):
        n, c, h, w = x.shape
        g = min(self.cfg.mbstd_group, n)
        if n % g:
            g = 1
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean((1, 2, 3))   # (N / g,)
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], 1)

    def forward(self, img):
        x = self.blocks(self.from_rgb(img))
        x = self.conv(self.minibatch_std(x))
        return self.out(self.fc(x.flatten(1))).squeeze(1)
