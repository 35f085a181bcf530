"""The image head on disk: ``model.pt`` (DifferNet-style density model on pooled features) and its
ONNX graph ``density.onnx`` (pooled features ``(N, T, D)`` in, score ``(N,)`` out).

``model.pt`` holds everything needed to rebuild the scorer: the feature settings (backbone, weights
hash, image size, scales, input normalisation, layers, dim), the density model's config and state
(its first block holds the feature mean/std from training). Score = mean over
``train.n_transforms_test`` rotations of the NLL per feature dimension (nats, every term).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from defectflow.config import Params
from defectflow.density import DensityConfig, DensityModel
from defectflow.features import FeatureExtractor
from defectflow.model_files import CONV_FILE, HEAD_FILE, MODEL_FILE, MODEL_FORMAT, ModelError, head_session


@dataclass
class LoadedModel:
    density: DensityModel
    features: dict                      # FeatureExtractor.describe() + pretrained, weights
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None
    _extractor: Optional[FeatureExtractor] = None
    _head: object = None

    @property
    def model_dir(self) -> Optional[Path]:
        return None if self.path is None else self.path.parent

    def head_session(self, threads: int = 2):
        """ONNX Runtime session of ``density.onnx`` (None when the folder has none: torch is used)."""
        if self._head is None:
            file = self.model_dir / HEAD_FILE if self.model_dir is not None else None
            self._head = head_session(file, threads, "density head") if file is not None and file.is_file() else False
        return self._head or None

    def score_features(self, feats: np.ndarray, threads: int = 2, backend: str = "auto") -> np.ndarray:
        """Scores ``(N,)`` float64 of pooled features ``(N, T, D)``: ONNX Runtime head, else torch."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if len(feats) == 0:
            return np.zeros(0)
        sess = self.head_session(threads) if backend in ("auto", "onnx") else None
        if sess is not None:
            return sess.run(["score"], {"features": feats})[0].astype(np.float64)
        with torch.no_grad():
            return self.density.score(torch.from_numpy(feats)).numpy().astype(np.float64)

    def extractor(self, params: Params, cache=None) -> FeatureExtractor:
        """The feature extractor the model was trained with; checks the backbone weights are the same."""
        if self._extractor is None:
            f = self.features
            weights = params.train.weights or f.get("weights")
            fx = FeatureExtractor(f["backbone"], image_size=f["image_size"], scales=f["scales"],
                                  pretrained=f["pretrained"], weights=weights,
                                  threads=params.train.threads, cache=cache,
                                  feature_cache=params.train.feature_cache, input_norm=f.get("input_norm", "none"))
            if fx.weights_id != f["weights_id"]:
                raise ModelError(f"{self.path}: backbone weights differ from training "
                                 f"({fx.weights_id} now, {f['weights_id']} then): retrain the model")
            if fx.dim != self.density.in_dim:
                raise ModelError(f"{self.path}: features have {fx.dim} dims, the model expects {self.density.in_dim}")
            self._extractor = fx
        return self._extractor


def save_model(path: Path, density: DensityModel, extractor: FeatureExtractor, params: Params,
               extra: dict | None = None) -> Path:
    """Write ``model.pt`` (plain dicts / tensors: loadable with ``weights_only=True``)."""
    state = {k: v.detach().clone() for k, v in density.state_dict().items()}
    features = {**extractor.describe(), "pretrained": bool(params.train.pretrained),
                "weights": params.train.weights}
    payload = {
        "format": MODEL_FORMAT,
        "features": features,
        "density": density.config.to_dict(),
        "state_dict": state,
        "feature_mean": state["blocks.0.mean"],
        "feature_std": state["blocks.0.std"],
        "score": "mean over test-time rotations of NLL per feature dim (nats); higher = more anomalous",
        "meta": dict(extra or {}),
    }
    torch.save(payload, path)
    return path


class _HeadGraph(torch.nn.Module):
    def __init__(self, density: DensityModel):
        super().__init__()
        self.density = density

    def forward(self, features):
        return self.density.score_graph(features)


def export_head(density: DensityModel, path: Path, n_transforms: int = 4) -> Path:
    """Write the density head as ONNX: ``features (N, T, in_dim) -> score (N,)`` (N and T dynamic)."""
    import warnings
    from defectflow.features import ONNX_OPSET

    dummy = torch.zeros(2, max(1, n_transforms), density.in_dim)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_HeadGraph(density.eval()), (dummy,), str(path), dynamo=False,
                          input_names=["features"], output_names=["score"],
                          dynamic_axes={"features": {0: "batch", 1: "transforms"}, "score": {0: "batch"}},
                          opset_version=ONNX_OPSET)
    return path


def load_model(model_dir: Path | str) -> LoadedModel:
    """Read ``model_dir/model.pt``; errors name the file."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        if (Path(model_dir) / CONV_FILE).is_file():
            raise ModelError(f"{path}: this model folder has the conv head only (train.head: conv); "
                             "this needs the image head (train.head: image or both)")
        raise ModelError(f"{path}: model not found (has the train stage run?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"{path}: not a readable model file: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: unknown model format (expected format {MODEL_FORMAT}); retrain")
    try:
        density = DensityModel.from_config(DensityConfig(**payload["density"]))
        density.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ModelError(f"{path}: model state does not fit its config: {err}") from None
    density.eval()
    return LoadedModel(density, dict(payload["features"]), dict(payload.get("meta") or {}), path)
