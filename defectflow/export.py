"""One ONNX model for deployment: backbone + pooling + density head, image tensor in, score out.

    defectflow export [--model models/model] [--out models/model.onnx]

Input ``image``: float32 ``(N, 3, S, S)``, RGB in [0, 1], already resized to ``train.image_size``
(``S``), as :func:`defectflow.features.load_image` + resize give it. Inside the graph: ImageNet
normalisation, the ``n_transforms_test`` rotations (multiples of 90 degrees: 1, 2 or 4 transforms),
each image scale (area downscale by an integer factor), the backbone, global average pooling,
the density model's NLL per dim averaged over the rotations. Output ``score``: ``(N,)``.

The pipeline itself scores with two ONNX Runtime sessions (backbone, head) and numpy
preprocessing, which also allows any rotation count; this file is the single-file artefact.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defectflow.backbones import build_backbone, get_backbone
from defectflow.errors import DefectflowError
from defectflow.features import ONNX_OPSET, rotation_angles, scale_sizes
from defectflow.fsutil import atomic_path
from defectflow.scoring import LoadedModel, load_model
from defectflow.stage import logger

log = logger("export")


class ExportError(DefectflowError):
    """The model cannot be exported as one ONNX graph with these settings."""


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``np.rot90(img, k)`` on the (H, W) axes of ``(N, C, H, W)``, from ops ONNX has (no aten::rot90)."""
    if k == 0:
        return x
    if k == 1:
        return x.transpose(2, 3).flip(2)
    if k == 2:
        return x.flip(2).flip(3)
    return x.transpose(2, 3).flip(3)


class FullScorer(nn.Module):
    """``image (N, 3, S, S) in [0, 1] -> score (N,)`` in torch (the graph that is exported)."""

    def __init__(self, model: LoadedModel, n_transforms: int):
        super().__init__()
        f = model.features
        spec = get_backbone(f["backbone"])
        self.size = int(f["image_size"])
        self.sizes = scale_sizes(self.size, f["scales"])
        angles = rotation_angles(n_transforms)
        if any(abs(a / 90 - round(a / 90)) > 1e-9 for a in angles):
            raise ExportError(f"train.n_transforms_test {n_transforms}: the exported graph rotates by multiples "
                              "of 90 degrees only (1, 2 or 4 transforms)")
        for s in self.sizes:
            if self.size % s:
                raise ExportError(f"scale size {s} px does not divide image_size {self.size}: the exported graph "
                                  "downscales by integer factors only")
        self.quarters = [int(round(a / 90)) % 4 for a in angles]
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.nets = nn.ModuleList([build_backbone(f["backbone"], pretrained=f["pretrained"], weights=f.get("weights"),
                                                  image_size=s) for s in self.sizes])
        self.density = model.density.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        n = x.shape[0]
        rots = torch.stack([_rot90(x, k) for k in self.quarters], dim=1)   # (N, T, 3, S, S)
        flat = rots.reshape(n * len(self.quarters), 3, self.size, self.size)
        pooled = []
        for size, net in zip(self.sizes, self.nets):
            xs = flat if size == self.size else F.avg_pool2d(flat, self.size // size)
            pooled.append(torch.cat([m.mean(dim=(2, 3)) for m in net(xs)], dim=1))
        feats = torch.cat(pooled, dim=1).reshape(n, len(self.quarters), -1)
        return self.density.score_graph(feats)


def export_model(model_dir: Path | str, out: Path | str, n_transforms: int) -> Path:
    """Write ``out`` (atomically): the single-file scorer of the model in ``model_dir``."""
    model = load_model(model_dir)
    scorer = FullScorer(model, n_transforms).eval()
    dummy = torch.rand(2, 3, scorer.size, scorer.size)
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, (dummy,), str(tmp), dynamo=False, input_names=["image"], output_names=["score"],
                          dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}}, opset_version=ONNX_OPSET)
    log.info("wrote %s (%.1f MB): image (N, 3, %d, %d) RGB in [0, 1] -> score (N,)", out,
             out.stat().st_size / 2**20, scorer.size, scorer.size)
    return out


def onnx_scores(path: Path | str, images: np.ndarray, threads: int = 2) -> np.ndarray:
    """Run an exported model on ``(N, 3, S, S)`` images: scores ``(N,)``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["score"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]
