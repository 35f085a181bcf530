"""Frozen-backbone image features, run with ONNX Runtime (DifferNet-style, multi-scale).

For every image and every transform (rotation by ``360 * k / n`` degrees, k = 0..n-1) and
every image scale in ``train.scales``, the backbone's feature maps (:mod:`defectflow.backbones`)
are global-average pooled and concatenated: one vector of
``len(scales) * spec.feature_dim`` values per (image, transform).

Image handling: any file OpenCV reads; BGR -> RGB, grayscale -> 3 channels, RGBA composited
over black, 16-bit scaled to [0, 1]; resized (area) to ``image_size``, rotated, then resized
per scale; the exported graph normalises with the backbone's mean/std.

The backbone is exported once per (backbone, weights hash, input size) to
``<cache_dir>/onnx/<name>-<weights id>-<size>px-v<N>.onnx`` (legacy TorchScript exporter:
torch 2.14's default dynamo exporter needs ``onnxscript``, which is not a dependency) and
run by ONNX Runtime with ``train.threads`` intra-op threads (~7x faster than torch eager on CPU).
The graph returns the maps (``map0..``) and their global-average-pooled concatenation (``pooled``).

Features of image files are cached on disk (:class:`FeatureCache`, ``<cache>/features/<key>/``):
one ``.npy`` per image, keyed by the file's content hash; ``<key>`` hashes backbone, weights id,
input size, scales, layers, transforms and the preprocessing version, so retraining the density
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np

from defectflow.backbones import BackboneSpec, build_backbone, get_backbone, resolve_weights, weights_id
from defectflow.errors import DefectflowError
from defectflow.fsutil import ImageReadError, atomic_path
from defectflow.stage import logger

EXPORT_VERSION = 3      # bump when the exported graph changes (invalidates cached .onnx files)
PREP_VERSION = 2        # bump when image preprocessing changes (invalidates cached features)
ONNX_OPSET = 17
DEFAULT_CACHE = Path(".cache/defectflow")
log = logger("features")


class FeatureError(DefectflowError):
    """Feature extraction could not run (bad image, bad export)."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where exported backbones live: ``path``, else ``$DEFECTFLOW_CACHE``, else ``.cache/defectflow``."""
    return Path(path or os.environ.get("DEFECTFLOW_CACHE") or DEFAULT_CACHE)


# ------------------------------------------------------------------ images
def _complete(data: np.ndarray, path) -> None:
    """Raise ImageReadError for a PNG without IEND or a JPEG without its end marker (truncated files:
    OpenCV would decode them with grey / garbage rows and only a warning on stderr)."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG"):
        if b"IEND" not in bytes(data[-32:]):
            raise ImageReadError(f"{path}: truncated PNG (no IEND chunk)")
    elif head.startswith(b"\xff\xd8"):
        tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")


def decode_image(data: np.ndarray, path: str | os.PathLike) -> tuple[np.ndarray, Optional[str]]:
    """Decode file bytes to float32 RGB ``(H, W, 3)`` in [0, 1]; also return what was converted
    (``"grayscale"``, ``"rgba"``, ``"16-bit"``, combined with ``+``) or None."""
    if data.size == 0:
        raise ImageReadError(f"{path}: empty image file")
    _complete(data, path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    conv = []
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
        conv.append("16-bit")
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}")
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == 1:
        conv.insert(0, "grayscale")
        out = np.repeat(img, 3, axis=2)
    elif channels == 4:
        conv.insert(0, "rgba")
        out = np.ascontiguousarray(img[:, :, 2::-1] * img[:, :, 3:4])   # composite over black
    elif channels == 3:
        out = np.ascontiguousarray(img[:, :, ::-1])
    else:
        raise ImageReadError(f"{path}: unsupported number of channels ({channels})")
    return out, ("+".join(conv) or None)


def read_bytes(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read ({err})") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as float32 RGB ``(H, W, 3)`` in [0, 1] (gray, RGBA and 16-bit converted;
    truncated PNG / JPEG files raise ImageReadError naming the file)."""
    img, conv = decode_image(read_bytes(path), path)
    if conv:
        log.debug("%s: converted %s image to 8-bit-range RGB", path, conv)
    return img


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


# ------------------------------------------------------------------ ONNX backbone
INPUT_NORMS = ("none", "percentile")
NORM_LOW, NORM_HIGH = 0.1, 0.9      # input_norm percentile: the 1st / 99th luminance percentiles land here
NORM_MIN_RANGE = 0.05               # ... and contrast is never stretched more than (0.8 / this) times


def percentile_stretch(image, image_size: int):
    """Per-image brightness / contrast normalisation (torch, in the exported graph): the 1st and 99th
    percentiles of the luminance (on every 4th pixel and row) are mapped to 0.1 and 0.9, then clipped to
    [0, 1]. Global gain and offset changes (a lamp ageing, exposure drift between sessions, tiles
    of varying darkness) then no longer move the features; local contrast (the defects) stays."""
    import torch

    lum = image.mean(dim=3)[:, ::4, ::4].flatten(1)                      # (N, M)
    k = max(1, int(round(0.01 * ((int(image_size) + 3) // 4) ** 2)))   # static: the graph is per input size
    hi = lum.topk(k, dim=1).values[:, k - 1]
    lo = -((-lum).topk(k, dim=1).values[:, k - 1])
    scale = (NORM_HIGH - NORM_LOW) / torch.clamp(hi - lo, min=NORM_MIN_RANGE)
    out = (image - lo.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1) + NORM_LOW
    return torch.clamp(out, 0.0, 1.0)


def backbone_graph(name: str, image_size: int, *, pretrained: bool = True,
                   weights: str | os.PathLike | None = None, input_norm: str = "none"):
    """Backbone ``name`` as exported and run: ``image (N, S, S, 3)`` float RGB in [0, 1] (decoded
    images as they come, no layout change or normalisation outside) ``-> (*maps, pooled)``; pooled
    = global average of every map, concatenated. ``input_norm="percentile"`` first applies
    :func:`percentile_stretch`. Torch module, eval mode."""
    import torch
    from torch import nn

    spec = get_backbone(name)
    if input_norm not in INPUT_NORMS:
        raise FeatureError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")

    class BackboneGraph(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.stretch = input_norm == "percentile"
            self.size = int(image_size)
            std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / std)
            self.register_buffer("shift", -torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) / std)

        def forward(self, image):
            if self.stretch:
                image = percentile_stretch(image, self.size)
            maps = self.inner(image.permute(0, 3, 1, 2) * self.scale + self.shift)
            return (*maps, torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))

    return BackboneGraph(build_backbone(name, pretrained=pretrained, weights=weights, image_size=image_size)).eval()


def export_onnx(name: str, image_size: int, path: Path, *, pretrained: bool = True,
                weights: str | os.PathLike | None = None, input_norm: str = "none") -> Path:
    """Export the feature module of backbone ``name`` for ``image_size`` px inputs to ``path``."""
    import torch

    net = backbone_graph(name, image_size, pretrained=pretrained, weights=weights, input_norm=input_norm)
    n_maps = len(get_backbone(name).layers)
    dummy = torch.zeros(1, image_size, image_size, 3)
    outputs = [f"map{i}" for i in range(n_maps)] + ["pooled"]
    axes = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=outputs, dynamic_axes=axes, opset_version=ONNX_OPSET)
    return path


def ort_session(path: str | os.PathLike, threads: int = 2, *, blocked_layout: bool = True):
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (one inter-op), warnings silenced.

    Worker threads do not spin-wait after a run: scoring alternates between sessions (backbone,
    heads) on few cores, and one session's spinning threads slowed the next by 10-20%.
    ``blocked_layout=False`` skips ONNX Runtime's blocked-channel (NCHWc) layout: it pays off
    for the backbone's large convolutions (2.6x) but costs the small heads layout changes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not blocked_layout:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxBackbone:
    """An ONNX Runtime session of one backbone at one input size: ``run(x) -> list of maps``."""

    def __init__(self, name: str, image_size: int, *, pretrained: bool = True,
                 weights: str | os.PathLike | None = None, threads: int = 2,
                 cache: str | os.PathLike | None = None, input_norm: str = "none"):
        self.name, self.image_size, self.input_norm = name, int(image_size), input_norm
        wpath = resolve_weights(name, weights, pretrained)
        self.weights_id = weights_id(wpath)
        tag = "" if input_norm == "none" else f"-{input_norm}"
        self.path = (cache_dir(cache) / "onnx" /
                     f"{name}-{self.weights_id}-{self.image_size}px{tag}-v{EXPORT_VERSION}.onnx")
        if not self.path.is_file():
            log.info("exporting %s (%d px, input_norm %s) to %s", name, self.image_size, input_norm, self.path)
            export_onnx(name, self.image_size, self.path, pretrained=pretrained, weights=wpath, input_norm=input_norm)
        try:
            self.session = ort_session(self.path, threads)
        except Exception as err:  # a truncated / foreign cache file
            raise FeatureError(f"{self.path}: cached ONNX backbone is unreadable ({err}); delete it to re-export") from None

        outs = [o.name for o in self.session.get_outputs()]
        self.map_names = [o for o in outs if o.startswith("map")]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Feature maps ``[(B, C_i, h_i, w_i)]`` of a prepared batch (:func:`prepare`)."""
        return self.session.run(self.map_names, {"image": np.ascontiguousarray(x, dtype=np.float32)})

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """Globally average-pooled maps, concatenated: ``(B, sum C_i)`` (pooling runs inside the graph)."""
        return self.session.run(["pooled"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def outputs(self, x: np.ndarray, names: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """The named outputs (``map0..``, ``pooled``) of one pass over ``x``, in network batches of
        ``batch_size`` (bounds ONNX Runtime's activation memory)."""
        parts = [self.session.run(list(names), {"image": np.ascontiguousarray(x[i:i + batch_size], np.float32)})
                 for i in range(0, len(x), batch_size)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


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
