"""Generator quality offline: KID and FID on the project's backbone features (no Inception weights here).

Features are the pooled EfficientNet-Lite0 maps (:class:`defectflow.onnx_backbone.OnnxBackbone`) of
images resized to ``FEATURE_SIZE``. KID is the unbiased squared MMD with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018); FID the Frechet distance of Gaussian fits. The
features are divided by one scale from the reals (:func:`defectflow.synth.fit.fit`), and the
values are on this backbone's scale, so compare them with each other and with the floor
``kid_real_halves`` (two halves of the real goods), not with published Inception figures.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

FEATURE_SIZE = 128
FEATURE_BACKBONE = "efficientnet_lite0"


class FeatureModel:
    """Pooled backbone features of ``(N, 3, S, S)`` tensors in [-1, 1]."""

    def __init__(self, threads: int = 1, backbone: str = FEATURE_BACKBONE, size: int = FEATURE_SIZE,
                 cache: str | None = None):
        from defectflow.onnx_backbone import OnnxBackbone
        self.size = size
        self.net = OnnxBackbone(backbone, size, threads=threads, cache=cache)

    def __call__(self, images: torch.Tensor, batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float().cpu()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            x = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            out.append(self.net.pooled(x))
        return np.concatenate(out).astype(np.float64)


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD between feature sets ``a`` (n, d) and ``b`` (m, d), cubic polynomial kernel."""
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n} and {m}")
    d = a.shape[1]
    kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    if np.iscomplexobj(root):
        root = root.real
    return float(np.square(mu_a - mu_b).sum() + np.trace(ca + cb - 2 * root))


def real_halves_kid(features: np.ndarray, seed: int) -> float:
    """KID between two random halves of real features: the floor a perfect generator would reach."""
    idx = np.random.default_rng(seed).permutation(len(features))
    half = len(idx) // 2
    return kid(features[idx[:half]], features[idx[half:2 * half]])


def image_grid(fakes: torch.Tensor, reals: torch.Tensor, cols: int = 8) -> np.ndarray:
    """Uint8 RGB grid: the rows of ``fakes`` on top, then a white band, then the rows of ``reals``."""
    def tile(x):
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        n, s = len(x), x.shape[1]
        rows = -(-n // cols)
        grid = np.full((rows * s, cols * s, 3), 255, np.uint8)
        for i, im in enumerate(x):
            r, c = divmod(i, cols)
            grid[r * s:(r + 1) * s, c * s:(c + 1) * s] = im
        return grid
    top, bottom = tile(fakes), tile(reals)
    band = np.full((max(2, top.shape[0] // 32), top.shape[1], 3), 255, np.uint8)
    return np.concatenate([top, band, bottom])
