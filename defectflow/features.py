"""Frozen-backbone image features, run with ONNX Runtime (DifferNet-style, multi-scale).

For every image and every transform (rotation by ``360 * k / n`` degrees, k = 0..n-1) and
every image scale in ``train.scales``, the backbone's feature maps (:mod:`defectflow.backbones`)
are global-average pooled and concatenated: one vector of
``len(scales) * spec.feature_dim`` values per (image, transform).

Image handling: any file OpenCV reads; BGR -> RGB, grayscale -> 3 channels, RGBA composited
over black, 16-bit scaled to [0, 1]; resized (area) to ``image_size``, rotated, then resized
per scale, normalised with the backbone's mean/std.

The backbone is exported once per (backbone, weights hash, input size) to
``<cache_dir>/onnx/<name>-<weights id>-<size>px-v<N>.onnx`` (legacy TorchScript exporter:
torch 2.14's default dynamo exporter needs ``onnxscript``, which is not a dependency) and
run by ONNX Runtime with ``train.threads`` intra-op threads (~7x faster than torch eager on CPU).

>>> fx = FeatureExtractor.from_params(params.train)            # doctest: +SKIP
>>> feats = fx.extract(["a.png", "b.png"], n_transforms=4)       # doctest: +SKIP
>>> feats.shape        # (images, transforms, fx.dim)           # doctest: +SKIP
(2, 4, 944)
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from defectflow.backbones import BackboneSpec, build_backbone, get_backbone, resolve_weights, weights_id
from defectflow.errors import DefectflowError
from defectflow.fsutil import ImageReadError, atomic_path, read_image
from defectflow.stage import logger

EXPORT_VERSION = 1      # bump when the exported graph changes (invalidates cached .onnx files)
ONNX_OPSET = 17
DEFAULT_CACHE = Path(".cache/defectflow")
log = logger("features")


class FeatureError(DefectflowError):
    """Feature extraction could not run (bad image, bad export)."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where exported backbones live: ``path``, else ``$DEFECTFLOW_CACHE``, else ``.cache/defectflow``."""
    return Path(path or os.environ.get("DEFECTFLOW_CACHE") or DEFAULT_CACHE)


# ------------------------------------------------------------------ images
def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as float32 RGB ``(H, W, 3)`` in [0, 1] (gray, RGBA and 16-bit converted)."""
    img = read_image(path, cv2.IMREAD_UNCHANGED)
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}")
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 4:
        rgb = img[:, :, 2::-1] * img[:, :, 3:4]          # composite over black
        return np.ascontiguousarray(rgb)
    if channels == 3:
        return np.ascontiguousarray(img[:, :, ::-1])
    raise ImageReadError(f"{path}: unsupported number of channels ({channels})")


def rotation_angles(n: int) -> list[float]:
    """The ``n`` test/train transforms: rotations by ``360 * k / n`` degrees (k = 0 is the identity)."""
    if n < 1:
        raise ValueError(f"n_transforms must be >= 1, got {n}")
    return [360.0 * k / n for k in range(n)]


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``img`` (H, W, C) counter-clockwise; exact for multiples of 90, else reflect-padded."""
    quarter = degrees / 90.0
    if abs(quarter - round(quarter)) < 1e-9:
        return np.ascontiguousarray(np.rot90(img, int(round(quarter)) % 4))
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def scale_sizes(image_size: int, scales: Sequence[float]) -> list[int]:
    return [max(8, int(round(image_size * s))) for s in scales]


def prepare(images: Sequence[np.ndarray], n_transforms: int, image_size: int, scales: Sequence[float],
            mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Network inputs for ``images`` (float RGB in [0, 1]): one ``(N * T, 3, s, s)`` array per scale.

    Row ``i * T + t`` is image ``i`` under transform ``t``.
    """
    sizes = scale_sizes(image_size, scales)
    m = np.asarray(mean, np.float32)
    sd = np.asarray(std, np.float32)
    out = [np.empty((len(images) * n_transforms, 3, s, s), np.float32) for s in sizes]
    for i, img in enumerate(images):
        base = _resize(img, image_size)
        for t, angle in enumerate(rotation_angles(n_transforms)):
            rot = rotate(base, angle)
            for k, size in enumerate(sizes):
                x = (_resize(rot, size) - m) / sd
                out[k][i * n_transforms + t] = x.transpose(2, 0, 1)
    return out


def pool(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Global average pool each ``(N, C, h, w)`` map and concatenate: ``(N, sum C)``."""
    return np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1)


# ------------------------------------------------------------------ ONNX backbone
def export_onnx(name: str, image_size: int, path: Path, *, pretrained: bool = True,
                weights: str | os.PathLike | None = None) -> Path:
    """Export the feature module of backbone ``name`` for ``image_size`` px inputs to ``path``."""
    import torch

    net = build_backbone(name, pretrained=pretrained, weights=weights, image_size=image_size)
    n_maps = len(get_backbone(name).layers)
    dummy = torch.zeros(1, 3, image_size, image_size)
    outputs = [f"map{i}" for i in range(n_maps)]
    axes = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=outputs, dynamic_axes=axes, opset_version=ONNX_OPSET)
    return path


class OnnxBackbone:
    """An ONNX Runtime session of one backbone at one input size: ``run(x) -> list of maps``."""

    def __init__(self, name: str, image_size: int, *, pretrained: bool = True,
                 weights: str | os.PathLike | None = None, threads: int = 2,
                 cache: str | os.PathLike | None = None):
        import onnxruntime as ort

        self.name, self.image_size = name, int(image_size)
        wpath = resolve_weights(name, weights, pretrained)
        self.weights_id = weights_id(wpath)
        self.path = cache_dir(cache) / "onnx" / f"{name}-{self.weights_id}-{self.image_size}px-v{EXPORT_VERSION}.onnx"
        if not self.path.is_file():
            log.info("exporting %s (%d px) to %s", name, self.image_size, self.path)
            export_onnx(name, self.image_size, self.path, pretrained=pretrained, weights=wpath)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # a truncated / foreign cache file
            raise FeatureError(f"{self.path}: cached ONNX backbone is unreadable ({err}); delete it to re-export") from None

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})


# ------------------------------------------------------------------ extractor
class FeatureExtractor:
    """Pooled multi-scale backbone features of image files, ``(N, T, dim)`` per call."""

    def __init__(self, backbone: str = "efficientnet_lite0", *, image_size: int = 224,
                 scales: Sequence[float] = (1.0,), pretrained: bool = True,
                 weights: str | os.PathLike | None = None, threads: int = 2, batch_size: int = 16,
                 cache: str | os.PathLike | None = None):
        self.spec: BackboneSpec = get_backbone(backbone)
        self.image_size = int(image_size)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales:
            raise ValueError("scales must name at least one image scale")
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        self.nets = [OnnxBackbone(backbone, s, pretrained=pretrained, weights=weights, threads=threads, cache=cache)
                     for s in scale_sizes(self.image_size, self.scales)]
        self.weights_id = self.nets[0].weights_id

    @classmethod
    def from_params(cls, train, cache: str | os.PathLike | None = None, batch_size: int = 16) -> "FeatureExtractor":
        """Build from ``params.train`` (backbone, weights, pretrained, image_size, scales, threads)."""
        return cls(train.backbone, image_size=train.image_size, scales=train.scales, pretrained=train.pretrained,
                   weights=train.weights, threads=train.threads, batch_size=batch_size, cache=cache)

    @property
    def dim(self) -> int:
        return len(self.scales) * self.spec.feature_dim

    def describe(self) -> dict:
        return {"backbone": self.spec.name, "weights_id": self.weights_id, "image_size": self.image_size,
                "scales": list(self.scales), "layers": [l.name for l in self.spec.layers],
                "feature_dim": self.dim}

    def features(self, images: Sequence[np.ndarray], n_transforms: int) -> np.ndarray:
        """Features of in-memory float RGB images: ``(N, n_transforms, dim)`` float32."""
        inputs = prepare(images, n_transforms, self.image_size, self.scales, self.spec.mean, self.spec.std)
        step = self.batch_size          # network batch: bounds ONNX Runtime's activation memory
        pooled = [np.concatenate([pool(net.run(x[i:i + step])) for i in range(0, len(x), step)])
                  for net, x in zip(self.nets, inputs)]
        return np.concatenate(pooled, axis=1).reshape(len(images), n_transforms, self.dim).astype(np.float32)

    def extract(self, paths: Iterable[str | os.PathLike], n_transforms: int = 1,
                progress: bool = False, desc: str = "features") -> np.ndarray:
        """Features of image files: ``(N, n_transforms, dim)`` float32; loading overlaps inference."""
        paths = [Path(p) for p in paths]
        out = np.empty((len(paths), n_transforms, self.dim), np.float32)
        if not paths:
            return out
        batches = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False)
        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool_:
            def load(batch):
                return [pool_.submit(_load_small, p, self.image_size) for p in batch]
            pending = load(batches[0])
            start = 0
            for b, batch in enumerate(batches):
                images = [f.result() for f in pending]
                if b + 1 < len(batches):
                    pending = load(batches[b + 1])
                out[start:start + len(batch)] = self.features(images, n_transforms)
                start += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out


def _load_small(path: Path, size: int) -> np.ndarray:
    """Load and shrink to ``size`` right away (keeps big frames out of memory)."""
    return _resize(load_image(path), size)
