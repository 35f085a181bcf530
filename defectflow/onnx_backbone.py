"""The frozen backbone as an ONNX Runtime graph: ``image (N, S, S, 3)`` RGB in [0, 1] -> maps, pooled.

Exported once per (backbone, weights hash, input size, input normalisation) to
``<cache_dir>/onnx/<name>-<weights id>-<size>px[-<norm>]-v<N>.onnx`` with the legacy TorchScript
exporter (torch 2.14's default dynamo exporter needs ``onnxscript``, which is not a dependency) and
run by ONNX Runtime with ``train.threads`` intra-op threads (several times faster than torch eager on
CPU). Inside the graph: the optional per-image brightness / contrast normalisation
(``train.input_norm``), the layout change and the backbone's mean / std, the maps (``map0..``) and
their global-average-pooled concatenation (``pooled``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from defectflow.backbones import build_backbone, get_backbone, resolve_weights, weights_id
from defectflow.errors import DefectflowError
from defectflow.fsutil import atomic_path
from defectflow.stage import logger

EXPORT_VERSION = 3      # bump when the exported graph changes (invalidates cached .onnx files)
ONNX_OPSET = 17
DEFAULT_CACHE = Path(".cache/defectflow")
log = logger("features")


class FeatureError(DefectflowError):
    """Feature extraction could not run (bad image, bad export)."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where exported backbones live: ``path``, else ``$DEFECTFLOW_CACHE``, else ``.cache/defectflow``."""
    return Path(path or os.environ.get("DEFECTFLOW_CACHE") or DEFAULT_CACHE)


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


BATCH_PIXELS = 32 * 224 * 224   # pixels of one network batch: 32 images at 224 px, 8 at 448 (about 0.3 GB of activations)


def network_batch(batch_size: int, pixels_per_image: int) -> int:
    """At most ``batch_size`` images, and at most BATCH_PIXELS pixels, per network batch (at least one)."""
    return max(1, min(int(batch_size), BATCH_PIXELS // max(1, int(pixels_per_image))))


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
        ``batch_size`` images, fewer for inputs over 224 px (:func:`network_batch`: ONNX Runtime's
        activation memory grows with the pixels of a batch)."""
        batch_size = network_batch(batch_size, x.shape[1] * x.shape[2])
        parts = [self.session.run(list(names), {"image": np.ascontiguousarray(x[i:i + batch_size], np.float32)})
                 for i in range(0, len(x), batch_size)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
