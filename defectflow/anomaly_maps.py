"""Anomaly maps from the convolutional density model: maps at image size, pixel AUROC, boxes, overlays.

Pipeline (seed 003, stages 6-7)::

    fx = MapExtractor("efficientnet_lite0", image_size=224, levels=(0, 1))
    maps = fx.extract(paths)                                 # [(N, C_i, h_i, w_i)] unpooled backbone maps
    nll = model.nll_per_dim_maps(maps)                       # per level, nats per channel, (N, h_i, w_i)
    amap = anomaly_maps(nll, (224, 224), sigma=4.0)          # resample, mean over levels, blur, upsample
    score = image_scores(amap, "max")                        # image score from the map
    thr = good_pixel_threshold(val_amap, fpr=0.001)          # from good validation maps only
    boxes = boxes_from_map(amap[0], thr, min_area=0.001, image_size=(w, h))

Map values are NLL per channel in nats (higher = more anomalous), blurred. Boxes come back in
the original image's pixel coordinates, ``x1``/``y1`` exclusive (the project's convention).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from defectflow.errors import DefectflowError
from defectflow.fsutil import ImageReadError, read_image


class AnomalyMapError(DefectflowError):
    """Bad anomaly-map inputs (shapes, masks)."""


# ------------------------------------------------------------------ unpooled backbone maps
class MapExtractor:
    """Unpooled backbone feature maps of images, run with ONNX Runtime (the cached export of
    :class:`defectflow.features.OnnxBackbone`). ``levels`` index ``spec.layers`` (0 = stride 8 for
    EfficientNet-Lite0, 1 = stride 16, 2 = stride 32)."""

    def __init__(self, backbone: str = "efficientnet_lite0", *, image_size: int = 224,
                 levels: Sequence[int] = (0, 1), pretrained: bool = True,
                 weights: str | os.PathLike | None = None, threads: int = 2, batch_size: int = 16,
                 cache: str | os.PathLike | None = None, input_norm: str = "none"):
        from defectflow.backbones import get_backbone
        from defectflow.features import OnnxBackbone

        self.spec = get_backbone(backbone)
        self.levels = tuple(int(i) for i in levels)
        if not self.levels or any(not 0 <= i < len(self.spec.layers) for i in self.levels):
            raise AnomalyMapError(f"levels {list(levels)} out of range for backbone '{backbone}' "
                                  f"({len(self.spec.layers)} layers)")
        self.image_size = int(image_size)
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        self.input_norm = input_norm
        self.net = OnnxBackbone(backbone, self.image_size, pretrained=pretrained, weights=weights,
                                threads=threads, cache=cache, input_norm=input_norm)
        self.weights_id = self.net.weights_id

    @property
    def channels(self) -> list[int]:
        return [self.spec.layers[i].channels for i in self.levels]

    @property
    def strides(self) -> list[int]:
        return [self.spec.layers[i].stride for i in self.levels]

    def describe(self) -> dict:
        return {"backbone": self.spec.name, "weights_id": self.weights_id, "image_size": self.image_size,
                "levels": list(self.levels), "layers": [self.spec.layers[i].name for i in self.levels],
                "channels": self.channels, "strides": self.strides, "input_norm": self.input_norm}

    def prepare(self, images: Sequence[np.ndarray], n_transforms: int = 1) -> np.ndarray:
        """Network input ``(N * T, s, s, 3)`` of float RGB images in [0, 1] (:func:`defectflow.features.prepare`)."""
        from defectflow.features import prepare
        return prepare(images, n_transforms, self.image_size, (1.0,))[0]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Maps of a prepared batch, in network batches: ``[(N, C_i, h_i, w_i)]``."""
        if not len(x):
            raise AnomalyMapError("no images")
        return self.net.outputs(x, [self.net.map_names[i] for i in self.levels], self.batch_size)

    def maps(self, images: Sequence[np.ndarray], n_transforms: int = 1) -> list[np.ndarray]:
        """Maps of in-memory float RGB images; row ``i * T + t`` = image i under rotation t."""
        return self.run(self.prepare(images, n_transforms))

    def extract(self, paths: Sequence[str | os.PathLike], n_transforms: int = 1,
                progress: bool = False, desc: str = "maps") -> list[np.ndarray]:
        """Maps of image files (decoded with ``threads`` workers): ``[(N * T, C_i, h_i, w_i)]`` float32."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise AnomalyMapError("no image paths given")
        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool:
            images = list(pool.map(lambda p: load_rgb(p, self.image_size), paths))
        out: list[list[np.ndarray]] = [[] for _ in self.levels]
        it = range(0, len(images), self.batch_size)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=desc, unit="batch", leave=False)
        for i in it:
            for k, m in enumerate(self.maps(images[i:i + self.batch_size], n_transforms)):
                out[k].append(m)
        return [np.concatenate(o).astype(np.float32, copy=False) for o in out]


def load_rgb(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Float RGB ``(H, W, 3)`` in [0, 1] (gray / RGBA / 16-bit converted), resized to ``size`` if given."""
    from defectflow.features import load_image

    img = load_image(path)
    if size is not None and img.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return img


# ------------------------------------------------------------------ maps
def gaussian_ksize(sigma: float) -> int:
    """Kernel size of the blur: ``2 * ceil(4 sigma) + 1`` (as scipy / anomalib)."""
    return 2 * int(np.ceil(4.0 * sigma)) + 1


def map_grid(level_shapes: Sequence[tuple[int, int]], size: tuple[int, int]) -> tuple[int, int]:
    """The grid levels are combined and blurred on: three samples per cell of the finest level, one
    on its centre (an odd factor keeps a one-cell peak), at most ``size``. 84 x 84 for 224 px and a
    stride-8 finest level: 7x fewer pixels to blur, within 2% of blurring at image size."""
    return (min(int(size[0]), 3 * max(s[0] for s in level_shapes)),
            min(int(size[1]), 3 * max(s[1] for s in level_shapes)))


def combine_levels(level_maps: Sequence, size: tuple[int, int], sigma: float = 4.0,
                   level_norm: Optional[Sequence[tuple[float, float]]] = None) -> np.ndarray:
    """Per-level maps ``[(N, h_i, w_i)]`` -> ``(N, gh, gw)`` float32 on :func:`map_grid`: each level
    bilinearly resampled to the grid (half-pixel centres), optionally standardised with
    ``level_norm[i] = (mean, std)`` (from good *validation* maps, see :func:`level_stats`),
    averaged over levels, then Gaussian-blurred (``sigma`` px at image size ``size``, scaled to the
    grid; 0 = off). Image scores come from this map; :func:`anomaly_maps` upsamples it."""
    if not len(level_maps):
        raise AnomalyMapError("no level maps")
    arrs = [np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m, np.float32) for m in level_maps]
    n = arrs[0].shape[0]
    if any(a.ndim != 3 or a.shape[0] != n for a in arrs):
        raise AnomalyMapError(f"level maps must be (N, h, w) with the same N, got {[a.shape for a in arrs]}")
    h, w = map_grid([a.shape[1:] for a in arrs], size)
    out = np.zeros((n, h, w), np.float32)
    for k, a in enumerate(arrs):
        mu, sd = level_norm[k] if level_norm is not None else (0.0, 1.0)
        for i in range(n):
            up = a[i] if a.shape[1:] == (h, w) else cv2.resize(a[i], (w, h), interpolation=cv2.INTER_LINEAR)
            out[i] += (up - mu) / sd
    out /= len(arrs)
    if sigma > 0:
        sy, sx = sigma * h / size[0], sigma * w / size[1]
        ksize = (gaussian_ksize(sx), gaussian_ksize(sy))
        for i in range(n):
            out[i] = cv2.GaussianBlur(out[i], ksize, sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT_101)
    return out


def to_image_size(grid_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(N, gh, gw)`` grid maps -> ``(N, H, W)``, bilinear (half-pixel centres)."""
    h, w = int(size[0]), int(size[1])
    if grid_maps.shape[1:] == (h, w):
        return grid_maps
    out = np.empty((len(grid_maps), h, w), np.float32)
    for i, m in enumerate(grid_maps):
        out[i] = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def anomaly_maps(level_maps: Sequence, size: tuple[int, int], sigma: float = 4.0,
                 level_norm: Optional[Sequence[tuple[float, float]]] = None) -> np.ndarray:
    """Per-level maps ``[(N, h_i, w_i)]`` (higher = more anomalous) -> ``(N, H, W)`` float32 at
    ``size``: :func:`combine_levels` on the grid, then upsampled (bilinear: never above the grid's
    values). Image scores are taken on the grid."""
    return to_image_size(combine_levels(level_maps, size, sigma, level_norm), size)


def level_stats(level_maps: Sequence) -> list[tuple[float, float]]:
    """``(mean, std)`` of every level's values over good validation maps (for ``level_norm``)."""
    out = []
    for m in level_maps:
        a = np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m, np.float64)
        out.append((float(a.mean()), float(max(a.std(), 1e-6))))
    return out


def cell_map(level_maps: Sequence) -> np.ndarray:
    """Per-group maps ``[(N, h_i, w_i)]`` -> ``(N, h0, w0)`` on the finest group's own grid (one value per
    backbone cell, no blur): the coarser groups bilinearly resampled (half-pixel centres), then averaged."""
    arrs = [np.asarray(m.detach().cpu().numpy() if hasattr(m, "detach") else m, np.float32) for m in level_maps]
    h, w = max(a.shape[1] for a in arrs), max(a.shape[2] for a in arrs)
    out = np.zeros((arrs[0].shape[0], h, w), np.float32)
    for a in arrs:
        out += a if a.shape[1:] == (h, w) else np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
                                                          for m in a])
    return out / len(arrs)


def inner(maps: np.ndarray, border: int) -> np.ndarray:
    """``maps`` without ``border`` cells at each edge (at least one cell is kept)."""
    b = min(int(border), (maps.shape[1] - 1) // 2, (maps.shape[2] - 1) // 2)
    return maps[:, b:maps.shape[1] - b, b:maps.shape[2] - b] if b > 0 else maps


def cell_scores(level_maps: Sequence, method: str = "max", top_fraction: float = 0.01, border: int = 1) -> np.ndarray:
    """The conv head's image score: :func:`image_scores` of :func:`cell_map` without ``border`` cells at each
    edge. Cells at the image edge carry the backbone's zero padding (on a screw's bright background, on a tile's
    edge) and score high on good images; every interior cell still sees the edge through its receptive field."""
    return image_scores(inner(cell_map(level_maps), border), method, top_fraction)


def image_scores(amaps: np.ndarray, method: str = "max", top_fraction: float = 0.01) -> np.ndarray:
    """Image score from its map: ``max``, or ``topk`` = mean of the top ``top_fraction`` of pixels."""
    a = np.asarray(amaps, np.float32).reshape(len(amaps), -1)
    if method == "max":
        return a.max(axis=1).astype(np.float64)
    if method == "topk":
        k = max(1, int(round(top_fraction * a.shape[1])))
        return np.sort(np.partition(a, -k, axis=1)[:, -k:], axis=1).mean(axis=1).astype(np.float64)
    if method == "mean":
        return a.mean(axis=1).astype(np.float64)
    raise AnomalyMapError(f"unknown image score method '{method}' (max | topk | mean)")


# ------------------------------------------------------------------ masks and pixel AUROC
def load_mask(path: str | os.PathLike | None, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool ``(H, W)`` at ``size``; ``None`` (a good image) -> all False.
    Resized by area averaging, a pixel is defective if at least half of it was."""
    h, w = int(size[0]), int(size[1])
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return np.zeros((h, w), bool)
    m = read_image(path, cv2.IMREAD_GRAYSCALE)
    if m is None or m.ndim != 2:
        raise ImageReadError(f"{path}: not a single-channel mask")
    m = (m > 0).astype(np.float32)
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)
    return m >= 0.5


def pixel_auroc(amaps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], bins: int = 1 << 16,
                seed: int = 0) -> Optional[float]:
    """AUROC over every pixel of the images given (``None`` mask = good image, all zeros);
    None when the pixels have one class only. Maps and masks must share ``(H, W)``.

    Streamed: the pixels of each image are counted into ``bins`` bins (edges at quantiles of a seeded
    sample of all pixels), so memory does not grow with the images (sorting every pixel of 744 maps of
    256 x 256 took 2 GB). Pixels sharing a bin count as ties: within about 1 / ``bins`` of the exact value."""
    if len(masks) != len(amaps):
        raise AnomalyMapError(f"{len(amaps)} maps but {len(masks)} masks")
    if not len(amaps):
        return None
    rng = np.random.default_rng(seed)
    per = max(1, 2_000_000 // len(amaps))
    sample = np.concatenate([np.asarray(a, np.float32).ravel()[rng.integers(0, np.size(a), per)] for a in amaps])
    edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    pos = np.zeros(len(edges) + 1, np.int64)
    neg = np.zeros(len(edges) + 1, np.int64)
    for i, (a, m) in enumerate(zip(amaps, masks)):
        a = np.asarray(a, np.float32)
        if m is not None and m.shape != a.shape:
            raise AnomalyMapError(f"mask {i} has shape {m.shape}, maps have {a.shape}")
        idx = np.searchsorted(edges, a.ravel(), side="right")
        if m is None:
            neg += np.bincount(idx, minlength=len(pos))
        else:
            y = np.asarray(m, bool).ravel()
            pos += np.bincount(idx[y], minlength=len(pos))
            neg += np.bincount(idx[~y], minlength=len(pos))
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if not n_pos or not n_neg:
        return None
    below = np.concatenate([[0], np.cumsum(neg)[:-1]]).astype(np.float64)
    return float((pos * (below + 0.5 * neg)).sum() / (float(n_pos) * float(n_neg)))


def good_pixel_threshold(good_amaps: np.ndarray, fpr: float = 0.001) -> float:
    """Pixel threshold from good (validation) maps only: their ``1 - fpr`` quantile."""
    a = np.asarray(good_amaps, np.float32)
    if a.size == 0:
        raise AnomalyMapError("no good maps to fit a pixel threshold on")
    return float(np.quantile(a, 1.0 - fpr))


def f1_pixel_threshold(amaps: np.ndarray, masks: Sequence[np.ndarray | None], max_points: int = 2_000_000,
                       seed: int = 0) -> tuple[float, float]:
    """F1-optimal pixel threshold (seed 003) where masks exist: ``(threshold, f1)``. Pixels are
    subsampled (seeded) to ``max_points`` for speed. Needs defective pixels: validation only."""
    from sklearn.metrics import precision_recall_curve

    a = np.asarray(amaps, np.float32)
    y = np.stack([m if m is not None else np.zeros(a.shape[1:], bool) for m in masks]).ravel()
    s = a.ravel()
    if len(s) > max_points:
        idx = np.random.default_rng(seed).choice(len(s), max_points, replace=False)
        s, y = s[idx], y[idx]
    if not y.any():
        raise AnomalyMapError("no defective pixels: the F1 threshold needs masks with defects")
    p, r, t = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    i = int(np.argmax(f1[:-1]))
    return float(t[i]), float(f1[i])


# ------------------------------------------------------------------ boxes
@dataclass(frozen=True)
class Box:
    """A defect region: ``x1``/``y1`` exclusive, in the coordinates asked for; ``confidence`` = the
    score chosen (``max`` or ``mean`` of the map inside the region); ``area`` in map pixels."""

    x0: int
    y0: int
    x1: int
    y1: int
    confidence: float
    score_max: float
    score_mean: float
    area: int

    def to_dict(self) -> dict:
        return asdict(self)


def boxes_from_map(amap: np.ndarray, threshold: float, *, min_area: float = 0.001, confidence: str = "max",
                   image_size: Optional[tuple[int, int]] = None, max_boxes: int = 20) -> list[Box]:
    """Threshold one map ``(H, W)`` -> 8-connected components -> boxes, highest confidence first.

    ``min_area``: smallest region, a fraction of the map's pixels (< 1) or pixels (>= 1).
    ``image_size = (width, height)`` scales boxes to the original image (default: map pixels).
    """
    if confidence not in ("max", "mean"):
        raise AnomalyMapError(f"confidence must be 'max' or 'mean', got '{confidence}'")
    a = np.asarray(amap, np.float32)
    if a.ndim != 2:
        raise AnomalyMapError(f"expected one (H, W) map, got shape {a.shape}")
    h, w = a.shape
    binary = (a >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_px = min_area * h * w if min_area < 1 else min_area
    sx, sy = (image_size[0] / w, image_size[1] / h) if image_size else (1.0, 1.0)
    out = []
    for k in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[k])
        if area < min_px:
            continue
        vals = a[y:y + bh, x:x + bw][labels[y:y + bh, x:x + bw] == k]
        smax, smean = float(vals.max()), float(vals.mean())
        out.append(Box(int(np.floor(x * sx)), int(np.floor(y * sy)), int(np.ceil((x + bw) * sx)),
                       int(np.ceil((y + bh) * sy)), smax if confidence == "max" else smean, smax, smean, area))
    out.sort(key=lambda b: -b.confidence)
    return out[:max_boxes]


# ------------------------------------------------------------------ rendering
def overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Heat map (JET, ``vmin``..``vmax`` -> blue..red) blended over the image: uint8 **BGR** at the
    image's size. Use the same ``vmin``/``vmax`` for every image so colours compare across images
    (e.g. ``vmin`` = median of good validation pixels, ``vmax`` = a high quantile of test maps)."""
    img = np.asarray(image_rgb)
    if img.dtype != np.uint8:
        img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    a = cv2.resize(np.asarray(amap, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((a - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, alpha, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), 1.0 - alpha, 0.0)


def draw_boxes(image_bgr: np.ndarray, boxes: Sequence[Box], color=(0, 255, 0), label: bool = True) -> np.ndarray:
    """A copy of ``image_bgr`` with the boxes (and their confidence) drawn."""
    img = np.ascontiguousarray(image_bgr).copy()
    t = max(1, round(min(img.shape[:2]) / 200))
    for b in boxes:
        cv2.rectangle(img, (b.x0, b.y0), (b.x1 - 1, b.y1 - 1), color, t)
        if label:
            cv2.putText(img, f"{b.confidence:.3g}", (b.x0 + 2, max(12, b.y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * t, color, t, cv2.LINE_AA)
    return img


def contact_sheet(tiles: Sequence[np.ndarray], cols: int = 4, captions: Sequence[str] | None = None,
                  pad: int = 4) -> np.ndarray:
    """Tiles (same size, uint8 BGR) in a grid with optional captions; white padding."""
    if not tiles:
        raise AnomalyMapError("no tiles")
    h, w = tiles[0].shape[:2]
    cap = 18 if captions else 0
    rows = (len(tiles) + cols - 1) // cols
    sheet = np.full((rows * (h + cap + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + cap + pad), pad + c * (w + pad)
        sheet[y + cap:y + cap + h, x:x + w] = cv2.resize(tile, (w, h)) if tile.shape[:2] != (h, w) else tile
        if captions:
            cv2.putText(sheet, str(captions[i])[:40], (x, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
    return sheet


def maps_and_scores(model, feature_maps: Sequence, size: tuple[int, int], *, sigma: float = 4.0,
                    score: str = "max", top_fraction: float = 0.01,
                    level_norm: Optional[Sequence[tuple[float, float]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Backbone maps ``[(N, C_i, h_i, w_i)]`` -> (anomaly maps ``(N, H, W)``, image scores ``(N,)``)
    with a trained :class:`defectflow.density.conv.ConvFlow`: the one call scoring needs."""
    grid = combine_levels(model.nll_per_dim_maps(feature_maps), size, sigma, level_norm)
    return to_image_size(grid, size), image_scores(grid, score, top_fraction)
