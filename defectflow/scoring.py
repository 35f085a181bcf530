"""A trained model on disk, image scores, and per-product verdicts.

``model_dir/model.pt`` holds everything needed to rebuild the scorer: the feature
settings (backbone, weights hash, image size, scales, layers, dim), the density model's
config and state (its first block holds the feature mean/std from training).

Score = mean over ``train.n_transforms_test`` rotations of the density model's NLL per
feature dimension (nats, every term included); higher = more anomalous.

>>> scored = score_items(df, "models/model", params)         # doctest: +SKIP
>>> verdicts = product_verdicts(scored, threshold=1.23)        # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from defectflow.config import Params
from defectflow.density import DensityConfig, DensityModel
from defectflow.errors import DefectflowError
from defectflow.features import FeatureExtractor
from defectflow.manifest import VERDICTS

MODEL_FILE = "model.pt"
MODEL_FORMAT = 1


class ModelError(DefectflowError):
    """A model folder is missing, unreadable or does not match the current backbone weights."""


@dataclass
class LoadedModel:
    density: DensityModel
    features: dict                      # FeatureExtractor.describe() + pretrained, weights
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None
    _extractor: Optional[FeatureExtractor] = None

    def extractor(self, params: Params, cache=None) -> FeatureExtractor:
        """The feature extractor the model was trained with; checks the backbone weights are the same."""
        if self._extractor is None:
            f = self.features
            weights = params.train.weights or f.get("weights")
            fx = FeatureExtractor(f["backbone"], image_size=f["image_size"], scales=f["scales"],
                                  pretrained=f["pretrained"], weights=weights,
                                  threads=params.train.threads, cache=cache)
            if fx.weights_id != f["weights_id"]:
                raise ModelError(f"{self.path}: backbone weights differ from training "
                                 f"({fx.weights_id} now, {f['weights_id']} then): retrain the model")
            if fx.dim != self.density.dim:
                raise ModelError(f"{self.path}: features have {fx.dim} dims, the model expects {self.density.dim}")
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


def load_model(model_dir: Path | str) -> LoadedModel:
    """Read ``model_dir/model.pt``; errors name the file."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
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


def score_items(df: pd.DataFrame, model_dir: Path | str, params: Params, *,
                model: LoadedModel | None = None, progress: bool = False, cache=None) -> pd.DataFrame:
    """A copy of ``df`` with a ``score`` column for every row (the caller picks the rows)."""
    model = model or load_model(model_dir)
    out = df.copy()
    if len(df) == 0:
        out["score"] = pd.Series(dtype="float64")
        return out
    fx = model.extractor(params, cache=cache)
    torch.set_num_threads(params.train.threads)
    feats = fx.extract(df["image_path"].tolist(), params.train.n_transforms_test, progress=progress, desc="score")
    scores = model.density.score(torch.from_numpy(feats)).numpy().astype(np.float64)
    out["score"] = scores
    return out


def select_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows a split is judged on: ``is_center``, originals only (no augmented or synthetic copies)."""
    keep = (df["split"] == split) & df["is_center"].astype(bool)
    if "augment_of" in df.columns:
        keep &= df["augment_of"].isna()
    if "synthetic" in df.columns:
        keep &= ~df["synthetic"].fillna(False).astype(bool)
    return df[keep]


def _product_label(labels: pd.Series) -> str:
    values = set(labels)
    if "defect" in values:
        return "defect"
    return "good" if values == {"good"} else "unknown"


def product_verdicts(scores_df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row per product (VERDICTS schema): defective if any camera's score >= ``threshold``.

    A product's label is ``defect`` if any of its images is, ``good`` if all are, else ``unknown``.
    """
    rows = []
    for (product, run, split), g in scores_df.groupby(["product_id", "run", "split"], sort=True):
        per_cam = g.groupby("camera")["score"].max()
        flagged = sorted(str(c) for c, s in per_cam.items() if s >= threshold)
        rows.append({
            "product_id": str(product), "run": str(run), "split": str(split),
            "label": _product_label(g["label"]),
            "n_cameras": int(per_cam.size),
            "max_score": float(per_cam.max()),
            "flagged_cameras": ",".join(flagged),
            "verdict": "defect" if flagged else "good",
        })
    return pd.DataFrame(rows, columns=VERDICTS.names)


def judge(df: pd.DataFrame, model_dir: Path | str, params: Params, threshold: float, *,
          model: LoadedModel | None = None, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``df``'s rows, mark ``pred_defect``, and decide per product: (scored rows, verdicts)."""
    scored = score_items(df, model_dir, params, model=model, progress=progress)
    scored["pred_defect"] = scored["score"] >= threshold
    return scored, product_verdicts(scored, threshold)
