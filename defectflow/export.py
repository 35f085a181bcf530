"""One ONNX model for deployment: image tensor in, the pipeline's scores (and anomaly map) out.

    defectflow export [--model models/model] [--out models/model.onnx]

Input ``image``: float32 ``(N, S, S, 3)``, RGB in [0, 1] (channels last, as decoders give it),
already resized to ``train.image_size`` (``S``), as :func:`defectflow.features.load_image` + resize
give it. Inside the graph: the ``n_transforms_test`` rotations (multiples of 90 degrees: 1, 2 or 4 transforms),
each image scale (area downscale by an integer factor), one pass of the pipeline's backbone graph
(:func:`defectflow.features.backbone_graph`: ImageNet normalisation, maps, pooled) per rotation and scale,
then every head of the model folder:

- image head: global average pooling, the density model's NLL per dim averaged over the rotations
  -> ``score_image (N,)``
- conv head: the unrotated pass's maps -> per-position NLL per channel -> bilinear resampling to
  the map grid (three samples per finest-level cell) -> mean over levels -> Gaussian blur
  (``maps.sigma``, scaled to the grid) -> image score -> ``score_conv (N,)`` (with a patch memory: the
  largest memory distance over the ``maps.verify_share`` highest unblurred cells; else ``maps.score``); the
  same over ``maps.levels``, upsampled to ``S`` -> ``anomaly_map (N, S, S)``

and ``score (N,)``, the score the threshold in ``threshold.json`` applies to: ``train.score_from``'s
head, or ``fused`` (each head standardised with ``fusion.json``, weighted mean). The pipeline itself
scores with ONNX Runtime sessions (backbone, heads) and numpy / OpenCV around them, which also
allows any rotation count; this file is the single-file artefact, tested equal to the pipeline.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defectflow.anomaly_maps import gaussian_ksize, map_grid
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.features import ONNX_OPSET, backbone_graph, ort_session, rotation_angles, scale_sizes
from defectflow.fsutil import atomic_path
from defectflow.scoring import HEADS, Heads, LoadedModel, fusion_weights, load_heads
from defectflow.stage import logger

log = logger("export")


class ExportError(DefectflowError):
    """The model cannot be exported as one ONNX graph with these settings."""


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``np.rot90(img, k)`` on the (H, W) axes of ``(N, H, W, C)``, from ops ONNX has (no aten::rot90)."""
    if k == 0:
        return x
    if k == 1:
        return x.transpose(1, 2).flip(1)
    if k == 2:
        return x.flip(1).flip(2)
    return x.transpose(1, 2).flip(2)


class FullScorer(nn.Module):
    """``image (N, S, S, 3) in [0, 1] -> (score, score_image?, score_conv?, anomaly_map?)`` in torch
    (the graph that is exported). ``model``: a :class:`Heads`, or a :class:`LoadedModel` (image head)."""

    def __init__(self, model: Heads | LoadedModel, n_transforms: int, params: Params | None = None):
        super().__init__()
        heads = model if isinstance(model, Heads) else Heads(image=model)
        if heads.conv is not None and params is None:
            raise ExportError("exporting a conv head needs the params (maps.sigma, maps.score)")
        self.outputs = ["score", *(HEADS[h] for h in heads.names)] + (["anomaly_map"] if heads.conv else [])
        self.main = heads.scored_by(params) if params is not None else heads.names[0]
        self.fusion = heads.fusion if self.main == "fused" else None
        f = heads.image.features if heads.image is not None else heads.conv.meta["features"]
        self.size = int(f["image_size"])
        self.sizes = scale_sizes(self.size, f["scales"]) if heads.image is not None else [self.size]
        angles = rotation_angles(n_transforms if heads.image is not None else 1)
        if any(abs(a / 90 - round(a / 90)) > 1e-9 for a in angles):
            raise ExportError(f"train.n_transforms_test {n_transforms}: the exported graph rotates by multiples "
                              "of 90 degrees only (1, 2 or 4 transforms)")
        for s in self.sizes:
            if self.size % s:
                raise ExportError(f"scale size {s} px does not divide image_size {self.size}: the exported graph "
                                  "downscales by integer factors only")
        if heads.conv is not None and not heads.shares_pass(params) and heads.image is not None:
            raise ExportError("the conv head and the image head use different backbone inputs: export one head")
        self.quarters = [int(round(a / 90)) % 4 for a in angles]
        self.nets = nn.ModuleList([              # the pipeline's backbone graphs: normalise -> maps, pooled
            backbone_graph(f["backbone"], s, pretrained=f["pretrained"], weights=f.get("weights"),
                           input_norm=f.get("input_norm", "none")) for s in self.sizes])
        self.density = heads.image.density.eval() if heads.image is not None else None
        self.conv = heads.conv.model.eval() if heads.conv is not None else None
        if self.conv is not None:
            mp = params.maps
            self.levels = list(heads.conv.meta["features"]["levels"])
            self.shown = heads.conv.map_levels(params)
            self.map_score, self.top_fraction, self.sigma = mp.score, mp.top_fraction, float(mp.sigma)
            self.border = int(mp.border)
            self.verify_share = float(mp.verify_share)
            self.local_average = int(heads.conv.model.config.local_average)
            memory = heads.conv.memory
            self.register_buffer("memory", None if memory is None else torch.from_numpy(memory.bank.copy()))

    def _combine_levels(self, nll: list[torch.Tensor]) -> torch.Tensor:
        """:func:`defectflow.anomaly_maps.combine_levels`: ``(N, gh, gw)`` on the map grid (static shapes)."""
        gh, gw = map_grid([tuple(int(d) for d in m.shape[1:]) for m in nll], (self.size, self.size))
        up = [m.unsqueeze(1) if tuple(m.shape[1:]) == (gh, gw)
              else F.interpolate(m.unsqueeze(1), size=(gh, gw), mode="bilinear", align_corners=False) for m in nll]
        a = torch.stack(up).mean(dim=0)                                  # (N, 1, gh, gw)
        if self.sigma > 0:
            sy, sx = self.sigma * gh / self.size, self.sigma * gw / self.size
            ky, kx = gaussian_ksize(sy), gaussian_ksize(sx)
            if ky // 2 >= gh or kx // 2 >= gw:
                raise ExportError(f"maps.sigma {self.sigma}: the blur is wider than the {gh} x {gw} map grid")
            col = torch.from_numpy(cv2.getGaussianKernel(ky, sy, cv2.CV_32F).ravel().copy())
            row = torch.from_numpy(cv2.getGaussianKernel(kx, sx, cv2.CV_32F).ravel().copy())
            a = F.pad(a, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")   # = cv2.BORDER_REFLECT_101
            a = F.conv2d(F.conv2d(a, row.view(1, 1, 1, kx)), col.view(1, 1, ky, 1))
        return a[:, 0]

    def _to_image_size(self, grid: torch.Tensor) -> torch.Tensor:
        if tuple(grid.shape[1:]) == (self.size, self.size):
            return grid
        return F.interpolate(grid.unsqueeze(1), size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]

    @staticmethod
    def _cell_map(nll: list[torch.Tensor]) -> torch.Tensor:
        """:func:`defectflow.anomaly_maps.cell_map` (static shapes)."""
        h, w = max(int(m.shape[1]) for m in nll), max(int(m.shape[2]) for m in nll)
        up = [m if tuple(m.shape[1:]) == (h, w) else
              F.interpolate(m.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)[:, 0] for m in nll]
        return torch.stack(up).mean(dim=0)

    def _inner(self, cells: torch.Tensor) -> torch.Tensor:
        h, w = int(cells.shape[1]), int(cells.shape[2])
        b = min(self.border, (h - 1) // 2, (w - 1) // 2)
        return cells[:, b:h - b, b:w - b] if b > 0 else cells

    def _map_score(self, amap: torch.Tensor) -> torch.Tensor:
        flat = amap.flatten(1)
        if self.map_score == "max":
            return flat.amax(dim=1)
        if self.map_score == "mean":
            return flat.mean(dim=1)
        k = max(1, int(round(self.top_fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def _verified_score(self, cells: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`defectflow.conv_head.ConvHead.verified_scores`: the largest distance to the patch memory over
        the ``verify_share`` highest inner cells."""
        from defectflow.density.memory import patch_maps, verify_count

        h, w = int(cells.shape[1]), int(cells.shape[2])
        b = min(self.border, (h - 1) // 2, (w - 1) // 2)
        patches = patch_maps(maps, self.local_average, (h, w))
        if b > 0:
            patches = patches[:, :, b:h - b, b:w - b]
        inner = self._inner(cells).flatten(1)                               # (N, P)
        k = verify_count(self.verify_share, int(inner.shape[1]))
        top = inner.topk(k, dim=1).indices                                  # (N, k)
        feats = patches.flatten(2)                                          # (N, C, P)
        q = feats.gather(2, top.unsqueeze(1).expand(-1, feats.shape[1], -1)).transpose(1, 2)   # (N, k, C)
        bank = self.memory
        j = ((bank * bank).sum(-1)[None, None, :] - 2.0 * q @ bank.T).argmin(dim=-1)   # as PatchMemory.nearest:
        diff = q - bank[j]                                                  # the nearest row, its distance direct
        return (diff * diff).sum(-1).sqrt().amax(dim=1)

    def forward(self, image: torch.Tensor):
        n, t = image.shape[0], len(self.quarters)
        rots = torch.stack([_rot90(image, k) for k in self.quarters], dim=1)   # (N, T, S, S, 3)
        flat = rots.reshape(n * t, self.size, self.size, 3)
        pooled, conv_maps = [], None
        for size, net in zip(self.sizes, self.nets):
            xs = flat
            if size != self.size:                                   # area downscale by an integer factor
                xs = F.avg_pool2d(flat.permute(0, 3, 1, 2), self.size // size).permute(0, 2, 3, 1)
            *maps, p = net(xs)
            pooled.append(p)
            if size == self.size and conv_maps is None:
                conv_maps = [m.reshape(n, t, *m.shape[1:])[:, 0] for m in maps]   # the unrotated pass
        out = {}
        if self.density is not None:
            out[HEADS["image"]] = self.density.score_graph(torch.cat(pooled, dim=1).reshape(n, t, -1))
        if self.conv is not None:
            nll = [-ll / c for ll, c in zip(self.conv([conv_maps[i] for i in self.levels]), self.conv.channels)]
            chosen = nll if self.shown is None else [nll[i] for i in self.shown]
            cells = self._cell_map(chosen)
            out[HEADS["conv"]] = (self._map_score(self._inner(cells)) if self.memory is None else
                                  self._verified_score(cells, [conv_maps[i] for i in self.levels]))
            out["anomaly_map"] = self._to_image_size(self._combine_levels(chosen))
        if self.fusion is not None:
            w = fusion_weights(self.fusion)
            score = sum(w[h] * (out[HEADS[h]] - v["mean"]) / v["std"] for h, v in self.fusion["heads"].items())
        else:
            score = out[HEADS[self.main]]
        return tuple([score] + [out[o] for o in self.outputs[1:]])


def export_model(model_dir: Path | str, out: Path | str, params: Params) -> Path:
    """Write ``out`` (atomically): the single-file scorer of every head in ``model_dir``."""
    scorer = FullScorer(load_heads(model_dir), params.train.n_transforms_test, params).eval()
    dummy = torch.rand(2, scorer.size, scorer.size, 3)
    out = Path(out)
    axes = {name: {0: "batch"} for name in ["image", *scorer.outputs]}
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, (dummy,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=scorer.outputs, dynamic_axes=axes, opset_version=ONNX_OPSET)
    log.info("wrote %s (%.1f MB): image (N, %d, %d, 3) RGB in [0, 1] -> %s (score from %s)", out,
             out.stat().st_size / 2**20, scorer.size, scorer.size, ", ".join(scorer.outputs), scorer.main)
    return out


def onnx_scores(path: Path | str, images: np.ndarray, threads: int = 2, output: str = "score") -> np.ndarray:
    """Run an exported model on ``(N, S, S, 3)`` images (RGB in [0, 1]): its ``output`` (default the score ``(N,)``)."""
    return ort_session(path, threads).run([output], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]
