"""Frozen-backbone image features, run with ONNX Runtime (DifferNet-style, multi-scale).

For every image and every transform (rotation by ``360 * k / n`` degrees, k = 0..n-1) and
every image scale in ``train.scales``, the backbone's feature maps (:mod:`defectflow.backbones`)
are global-average pooled and concatenated: one vector of
``len(scales) * spec.feature_dim`` values per (image, transform).

Images are read by :mod:`defectflow.image_io` (float RGB in [0, 1]), resized (area) to
``image_size``, rotated, then resized per scale; the backbone runs as an ONNX Runtime graph
(:mod:`defectflow.onnx_backbone`: input normalisation, maps and their pooled concatenation).

Features of image files are cached on disk (:class:`FeatureCache`, ``<cache>/features/<key>/``):
one ``.npy`` per image, keyed by the file's content hash; ``<key>`` hashes backbone, weights id,
input size, scales, input normalisation, layers, transforms and the preprocessing version, so retraining the density
model (or re-scoring validation) never re-runs the backbone on an image it has seen.

>>> fx = FeatureExtractor.from_params(params.train)            # doctest: +SKIP
>>> feats = fx.extract(["a.png", "b.png"], n_transforms=4)       # doctest: +SKIP
>>> feats.shape        # (images, transforms, fx.dim)           # doctest: +SKIP
(2, 4, 944)
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np

from defectflow.backbones import BackboneSpec, get_backbone
from defectflow.fsutil import ImageReadError, atomic_path
from defectflow.image_io import decode_image, load_image, read_bytes  # noqa: F401  (re-exported)
from defectflow.onnx_backbone import (EXPORT_VERSION, INPUT_NORMS, ONNX_OPSET, FeatureError,  # noqa: F401
                                      OnnxBackbone, backbone_graph, cache_dir, export_onnx, ort_session,
                                      percentile_stretch)
from defectflow.stage import logger

PREP_VERSION = 2        # bump when image preprocessing changes (invalidates cached features)
log = logger("features")


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


def prepare(images: Sequence[np.ndarray], n_transforms: int, image_size: int,
            scales: Sequence[float]) -> list[np.ndarray]:
    """Network inputs for ``images`` (float RGB in [0, 1]): one ``(N * T, s, s, 3)`` array per scale,
    still RGB in [0, 1] (the exported graph changes the layout and normalises: :func:`backbone_graph`).

    Row ``i * T + t`` is image ``i`` under transform ``t``.
    """
    sizes = scale_sizes(image_size, scales)
    angles = rotation_angles(n_transforms)
    out = [np.empty((len(images) * n_transforms, s, s, 3), np.float32) for s in sizes]
    for i, img in enumerate(images):
        base = _resize(img, image_size)
        for t, angle in enumerate(angles):
            rot = rotate(base, angle) if angle else base
            for k, size in enumerate(sizes):
                out[k][i * n_transforms + t] = rot if size == image_size else _resize(rot, size)
    return out


def pool(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Global average pool each ``(N, C, h, w)`` map and concatenate: ``(N, sum C)``."""
    return np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1)


# ------------------------------------------------------------------ cache
class FeatureCache:
    """Per-image feature arrays on disk: ``<root>/<key>/<content hash[:2]>/<content hash>.npy``.

    ``key`` hashes every setting that changes the features (see :meth:`FeatureExtractor.cache_key`);
    ``<root>/<key>/key.json`` says which. Writes are atomic (temp file + rename), so concurrent
    writers and interrupted runs never leave a half-written entry; an unreadable entry is a miss.
    """

    def __init__(self, root: Path, settings: dict):
        blob = json.dumps(settings, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.settings = settings
        self.hits = self.misses = 0

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        path = self._path(digest)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            self.misses += 1
            return None
        if arr.shape != shape or arr.dtype != np.float32:
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, digest: str, value: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.dir / "key.json"
        if not info.is_file():
            with atomic_path(info) as tmp:
                tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True) + "\n")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(value, dtype=np.float32), allow_pickle=False)


def content_hash(data: np.ndarray) -> str:
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


# ------------------------------------------------------------------ extractor
class FeatureExtractor:
    """Pooled multi-scale backbone features of image files, ``(N, T, dim)`` per call.

    ``extract`` reads files (decode overlapped with inference), uses the on-disk feature cache
    (``use_cache``), and handles unreadable / truncated images as ``on_bad_image`` says:
    ``error`` stops with the path, ``skip`` leaves the row NaN and lists it in ``self.skipped``.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, image_size: int = 224,
                 scales: Sequence[float] = (1.0,), pretrained: bool = True,
                 weights: str | os.PathLike | None = None, threads: int = 2, batch_size: int = 32,
                 cache: str | os.PathLike | None = None, feature_cache: bool = True, input_norm: str = "none"):
        self.spec: BackboneSpec = get_backbone(backbone)
        self.input_norm = input_norm
        self.image_size = int(image_size)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales:
            raise ValueError("scales must name at least one image scale")
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        self.cache_root = cache_dir(cache)
        self.feature_cache = bool(feature_cache)
        self.nets = [OnnxBackbone(backbone, s, pretrained=pretrained, weights=weights, threads=threads, cache=cache,
                                  input_norm=input_norm) for s in scale_sizes(self.image_size, self.scales)]
        self.weights_id = self.nets[0].weights_id
        self.skipped: list[tuple[str, str]] = []
        self.conversions: dict[str, int] = {}

    @classmethod
    def from_params(cls, train, cache: str | os.PathLike | None = None, batch_size: int = 32) -> "FeatureExtractor":
        """Build from ``params.train`` (backbone, weights, pretrained, image_size, scales, threads, feature_cache,
        input_norm)."""
        return cls(train.backbone, image_size=train.image_size, scales=train.scales, pretrained=train.pretrained,
                   weights=train.weights, threads=train.threads, batch_size=batch_size, cache=cache,
                   feature_cache=getattr(train, "feature_cache", True), input_norm=train.input_norm)

    @property
    def dim(self) -> int:
        return len(self.scales) * self.spec.feature_dim

    def describe(self) -> dict:
        return {"backbone": self.spec.name, "weights_id": self.weights_id, "image_size": self.image_size,
                "scales": list(self.scales), "layers": [l.name for l in self.spec.layers],
                "feature_dim": self.dim, "input_norm": self.input_norm}

    def cache_settings(self, n_transforms: int) -> dict:
        return {**self.describe(), "n_transforms": int(n_transforms), "transforms": "rotations 360*k/T",
                "export_version": EXPORT_VERSION, "prep_version": PREP_VERSION,
                "mean": list(self.spec.mean), "std": list(self.spec.std)}

    def cache_for(self, n_transforms: int) -> FeatureCache:
        return FeatureCache(self.cache_root / "features", self.cache_settings(n_transforms))

    def features(self, images: Sequence[np.ndarray], n_transforms: int) -> np.ndarray:
        """Features of in-memory float RGB images: ``(N, n_transforms, dim)`` float32."""
        if not len(images):
            return np.empty((0, n_transforms, self.dim), np.float32)
        inputs = prepare(images, n_transforms, self.image_size, self.scales)
        return self.features_of_inputs(inputs).reshape(len(images), n_transforms, self.dim)

    def features_of_inputs(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Pooled features ``(M, dim)`` of prepared inputs (one ``(M, s, s, 3)`` array per scale)."""
        pooled = [net.outputs(x, ["pooled"], self.batch_size)[0] for net, x in zip(self.nets, inputs)]
        return np.concatenate(pooled, axis=1).astype(np.float32, copy=False)

    def extract(self, paths: Iterable[str | os.PathLike], n_transforms: int = 1,
                progress: bool = False, desc: str = "features", *, use_cache: bool | None = None,
                on_bad_image: str = "error") -> np.ndarray:
        """Features of image files: ``(N, n_transforms, dim)`` float32 (NaN rows for skipped images)."""
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        paths = [Path(p) for p in paths]
        use_cache = self.feature_cache if use_cache is None else bool(use_cache)
        cache = self.cache_for(n_transforms) if use_cache else None
        shape = (n_transforms, self.dim)
        out = np.full((len(paths), n_transforms, self.dim), np.nan, np.float32)
        self.skipped, self.conversions = [], {}
        if not paths:
            return out
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False)

        def load(idx: int):
            """(index, digest, image or None, error or None); cache hits give no image."""
            try:
                data = read_bytes(paths[idx])
                digest = content_hash(data) if cache is not None else None
                if cache is not None:
                    hit = cache.get(digest, shape)
                    if hit is not None:
                        return idx, digest, hit, None, None
                img, conv = decode_image(data, paths[idx])
                return idx, digest, None, _resize(img, self.image_size), conv
            except ImageReadError as err:
                if on_bad_image == "error":
                    raise
                return idx, None, None, None, str(err)

        batches = [range(i, min(i + self.batch_size, len(paths))) for i in range(0, len(paths), self.batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool_:
            pending = [pool_.submit(load, i) for i in batches[0]]
            for b in range(len(batches)):
                results = [f.result() for f in pending]
                if b + 1 < len(batches):
                    pending = [pool_.submit(load, i) for i in batches[b + 1]]
                todo = []
                for idx, digest, hit, img, extra in results:
                    if hit is not None:
                        out[idx] = hit
                    elif img is None:
                        self.skipped.append((str(paths[idx]), extra))
                        log.warning("skipped unreadable image %s", extra)
                    else:
                        if extra:
                            self.conversions[extra] = self.conversions.get(extra, 0) + 1
                        todo.append((idx, digest, img))
                if todo:
                    feats = self.features([t[2] for t in todo], n_transforms)
                    for (idx, digest, _), f in zip(todo, feats):
                        out[idx] = f
                        if cache is not None:
                            cache.put(digest, f)
                if bar is not None:
                    bar.update(len(results))
        if bar is not None:
            bar.close()
        for conv, n in sorted(self.conversions.items()):
            log.info("%s: converted %d %s image(s) to RGB in [0, 1]", desc, n, conv)
        if cache is not None and cache.hits:
            log.info("%s: %d of %d images from the feature cache %s", desc, cache.hits, len(paths), cache.dir)
        return out


def iter_decoded(paths: Sequence[str | os.PathLike], size: int, *, threads: int = 2, batch_size: int = 32,
                 on_bad_image: str = "error"):
    """Decode image files in batches, the next batch decoding while the caller works on this one.

    Yields ``(indices, images, skipped)``: the positions in ``paths`` of the readable images, those
    images (float RGB resized to ``size``) and the ``(path, error)`` of unreadable ones, which stop
    the run (``on_bad_image='error'``, the error names the file) or are skipped (``'skip'``).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    paths = [Path(p) for p in paths]

    def load(i: int):
        try:
            return i, _resize(load_image(paths[i]), size), None
        except ImageReadError as err:
            if on_bad_image == "error":
                raise
            log.warning("skipped unreadable image %s", err)
            return i, None, (str(paths[i]), str(err))

    batches = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool_:
        pending = [pool_.submit(load, i) for i in batches[0]]
        for b in range(len(batches)):
            results = [f.result() for f in pending]
            if b + 1 < len(batches):
                pending = [pool_.submit(load, i) for i in batches[b + 1]]
            yield ([i for i, img, _ in results if img is not None], [img for _, img, _ in results if img is not None],
                   [err for _, _, err in results if err is not None])
