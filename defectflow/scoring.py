"""A trained model on disk, image scores, and per-product verdicts.

``model_dir/model.pt`` holds everything needed to rebuild the scorer: the feature
settings (backbone, weights hash, image size, scales, layers, dim), the density model's
config and state (its first block holds the feature mean/std from training).

Score = mean over ``train.n_transforms_test`` rotations of the density model's NLL per
feature dimension (nats, every term included); higher = more anomalous.

Scoring runs without torch in the loop: the backbone is an ONNX Runtime session
(:mod:`defectflow.features`) and the density head is ``model_dir/density.onnx`` (pooled
features ``(N, T, D)`` in, score ``(N,)`` out), also run by ONNX Runtime; a model folder
without it falls back to the torch head.

Two heads (``train.head``): ``image`` (the above, ``model.pt``) and ``conv``, the fully
convolutional density model on unpooled feature maps (``conv.pt``, :mod:`defectflow.density.conv`):
per-position NLL -> anomaly map at ``train.image_size`` (:mod:`defectflow.anomaly_maps`) -> image
score (``maps.score``). Every head in the model folder is scored; its score goes to its
:data:`HEADS` column and ``score`` is the ``train.score_from`` head's (a folder with one head:
that one). The conv head also fills ``map_mean`` and, given a map threshold, ``map_area`` and
``n_boxes``; :func:`score_with_maps` also hands back the maps.

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
HEAD_FILE = "density.onnx"
VAL_SPLIT_FILE = "val_split.json"
CONV_FILE = "conv.pt"
MODEL_FORMAT = 1
HEADS = {"image": "score_image", "conv": "score_conv"}   # head -> the SCORES column with its score


class ModelError(DefectflowError):
    """A model folder is missing, unreadable or does not match the current backbone weights."""


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
            self._head = False
            if file is not None and file.is_file():
                import onnxruntime as ort
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                try:
                    self._head = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
                except Exception as err:
                    raise ModelError(f"{file}: unreadable ONNX density head ({err}); retrain or delete it") from None
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
                                  feature_cache=params.train.feature_cache)
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


# ------------------------------------------------------------------ conv head
def load_images(paths, size: int, on_bad_image: str = "error", threads: int = 2) -> tuple[list, list]:
    """Float RGB images resized to ``size`` (None where unreadable and ``on_bad_image == 'skip'``),
    and the skipped ``(path, error)`` pairs."""
    from concurrent.futures import ThreadPoolExecutor

    from defectflow.features import _resize, load_image
    from defectflow.fsutil import ImageReadError

    def one(p):
        try:
            return _resize(load_image(p), size), None
        except ImageReadError as err:
            if on_bad_image == "error":
                raise
            return None, (str(p), str(err))

    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        res = list(pool.map(one, [str(p) for p in paths]))
    return [r[0] for r in res], [r[1] for r in res if r[1] is not None]


def map_extractor(features: dict, params: Params):
    """The :class:`~defectflow.anomaly_maps.MapExtractor` of a conv head's ``features`` (from its meta or
    from ``MapExtractor.describe()`` + pretrained / weights)."""
    from defectflow.anomaly_maps import MapExtractor

    return MapExtractor(features["backbone"], image_size=features["image_size"], levels=features["levels"],
                        pretrained=features.get("pretrained", params.train.pretrained),
                        weights=params.train.weights or features.get("weights"), threads=params.train.threads)


def extract_maps(fx, paths, on_bad_image: str = "error", chunk: int = 64, progress: bool = False,
                 desc: str = "maps") -> tuple[list[np.ndarray], np.ndarray, list]:
    """Unpooled backbone maps of image files, one rotation: (``[(n_ok, C_i, h_i, w_i)]``, ok mask ``(N,)``,
    skipped ``(path, error)``). Unreadable images stop (``error``) or are left out (``skip``)."""
    paths = list(paths)
    ok = np.ones(len(paths), bool)
    skipped: list = []
    parts: list[list[np.ndarray]] = [[] for _ in fx.levels]
    it = range(0, len(paths), chunk)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, unit="chunk", leave=False)
    for i in it:
        imgs, sk = load_images(paths[i:i + chunk], fx.image_size, on_bad_image, fx.threads)
        skipped += sk
        good = [im for im in imgs if im is not None]
        ok[i:i + chunk] = [im is not None for im in imgs]
        if good:
            for k, m in enumerate(fx.maps(good)):
                parts[k].append(m)
    maps = [np.concatenate(p) if p else np.zeros((0, c, 1, 1), np.float32) for p, c in zip(parts, fx.channels)]
    return maps, ok, skipped


@dataclass
class ConvHead:
    """A trained conv head (``conv.pt``): the density model and its meta (features, best epochs)."""
    model: object                       # defectflow.density.conv.ConvFlow
    meta: dict
    path: Path
    _fx: object = None

    def extractor(self, params: Params):
        if self._fx is None:
            f = self.meta.get("features") or {}
            fx = map_extractor(f, params)
            if fx.weights_id != f.get("weights_id"):
                raise ModelError(f"{self.path}: backbone weights differ from training "
                                 f"({fx.weights_id} now, {f.get('weights_id')} then): retrain the model")
            self._fx = fx
        return self._fx

    def maps(self, paths, params: Params, progress: bool = False, chunk: int = 64,
             keep: bool = True, map_threshold: float | None = None) -> tuple[np.ndarray | None, dict, np.ndarray, list]:
        """Anomaly maps of ``paths`` at ``train.image_size`` (``(n_ok, H, W)`` if ``keep``), per-image summary
        columns (``score_conv``, ``map_mean``, ``map_area``, ``n_boxes``: arrays over the ok rows),
        the ok mask ``(N,)`` and the skipped images. Runs chunk by chunk (bounded memory)."""
        from defectflow.anomaly_maps import anomaly_maps, boxes_from_map, image_scores

        mp = params.maps
        fx = self.extractor(params)
        size = (fx.image_size, fx.image_size)
        paths = list(paths)
        ok = np.ones(len(paths), bool)
        skipped: list = []
        kept: list[np.ndarray] = []
        cols: dict[str, list] = {"score_conv": [], "map_mean": [], "map_area": [], "n_boxes": []}
        it = range(0, len(paths), chunk)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="conv maps", unit="chunk", leave=False)
        torch.set_num_threads(params.train.threads)
        for i in it:
            feats, ok_i, sk = extract_maps(fx, paths[i:i + chunk], params.train.on_bad_image, chunk)
            ok[i:i + chunk] = ok_i
            skipped += sk
            if not ok_i.any():
                continue
            amaps = anomaly_maps(self.model.nll_per_dim_maps(feats), size, mp.sigma)
            cols["score_conv"].append(image_scores(amaps, mp.score, mp.top_fraction))
            cols["map_mean"].append(amaps.reshape(len(amaps), -1).mean(axis=1).astype(np.float64))
            if map_threshold is not None:
                cols["map_area"].append((amaps >= map_threshold).reshape(len(amaps), -1).mean(axis=1))
                cols["n_boxes"].append(np.array([len(boxes_from_map(a, map_threshold, min_area=mp.min_area))
                                                 for a in amaps], np.int64))
            if keep:
                kept.append(amaps)
        out = {k: (np.concatenate(v) if v else None) for k, v in cols.items()}
        amaps = (np.concatenate(kept) if kept else np.zeros((0,) + size, np.float32)) if keep else None
        return amaps, out, ok, skipped


def load_conv_head(model_dir: Path | str) -> ConvHead:
    from defectflow.density.conv import ConvFitError, load_conv_flow

    path = Path(model_dir) / CONV_FILE
    if not path.is_file():
        raise ModelError(f"{path}: conv head not found (train.head was image when the model was trained?)")
    try:
        model, meta = load_conv_flow(path)
    except ConvFitError as err:
        raise ModelError(str(err)) from None
    return ConvHead(model, meta, path)


@dataclass
class Heads:
    """The heads of one model folder (``None`` where not trained)."""
    image: Optional[LoadedModel] = None
    conv: Optional[ConvHead] = None
    model_dir: Optional[Path] = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in ("image", "conv") if getattr(self, n) is not None)

    def scored_by(self, params: Params) -> str:
        """The head whose score is ``score`` (``train.score_from`` with both heads, else the only one)."""
        want = params.train.score_from if len(self.names) == 2 else self.names[0]
        if want not in self.names:
            raise ModelError(f"{self.model_dir}: train.score_from is {want} but the model has no {want} head "
                             f"(it has: {', '.join(self.names)}); retrain with train.head both or change score_from")
        return want


def load_heads(model_dir: Path | str) -> Heads:
    """Every head in ``model_dir``: ``model.pt`` (image) and/or ``conv.pt`` (conv); errors name the folder."""
    d = Path(model_dir)
    image = load_model(d) if (d / MODEL_FILE).is_file() else None
    conv = load_conv_head(d) if (d / CONV_FILE).is_file() else None
    if image is None and conv is None:
        raise ModelError(f"{d}: no model found ({MODEL_FILE} or {CONV_FILE}; has the train stage run?)")
    return Heads(image, conv, d)


def score_with_maps(df: pd.DataFrame, model_dir: Path | str, params: Params, *, model=None,
                    progress: bool = False, cache=None, keep_maps: bool = False,
                    map_threshold: float | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Score ``df``'s rows with every head of the model: (a copy of the readable rows with ``score``,
    the :data:`HEADS` columns and the conv head's map summary; the conv head's anomaly maps
    ``(n, H, W)`` of those rows when ``keep_maps`` and the model has a conv head, else None).
    ``model``: a :class:`Heads` or, for the image head alone, a :class:`LoadedModel`."""
    heads = (model if isinstance(model, Heads) else
             Heads(image=model, model_dir=Path(model_dir)) if isinstance(model, LoadedModel) else load_heads(model_dir))
    main = heads.scored_by(params)
    out = df.copy()
    for col in ["score", *(HEADS[h] for h in heads.names)]:
        out[col] = pd.Series(np.nan, index=out.index, dtype="float64")
    if len(df) == 0:
        return out, (np.zeros((0, 1, 1), np.float32) if keep_maps and heads.conv is not None else None)
    paths = df["image_path"].tolist()
    ok = np.ones(len(df), bool)
    skipped: list = []
    if heads.image is not None:
        fx = heads.image.extractor(params, cache=cache)
        torch.set_num_threads(params.train.threads)
        feats = fx.extract(paths, params.train.n_transforms_test, progress=progress, desc="score",
                           on_bad_image=params.train.on_bad_image)
        ok_i = ~np.isnan(feats).any(axis=(1, 2))
        skipped += list(fx.skipped)
        vals = np.full(len(df), np.nan)
        vals[ok_i] = heads.image.score_features(feats[ok_i], params.train.threads)
        out[HEADS["image"]] = vals
        ok &= ok_i
    amaps = None
    if heads.conv is not None:
        # rows the image head already found unreadable are not read again
        idx = np.flatnonzero(ok)
        amaps, cols, ok_c, sk = heads.conv.maps([paths[i] for i in idx], params, progress=progress,
                                               keep=keep_maps, map_threshold=map_threshold)
        seen = {p for p, _ in skipped}
        skipped += [s for s in sk if s[0] not in seen]
        good_idx = idx[ok_c]
        for name, vals in cols.items():
            if vals is not None:
                full = np.full(len(df), np.nan)
                full[good_idx] = vals
                out[name] = full if name != "n_boxes" else pd.array(
                    [int(v) if np.isfinite(v) else None for v in full], dtype="Int64")
        ok_all = np.zeros(len(df), bool)
        ok_all[good_idx] = True
        ok &= ok_all                      # amaps rows = good_idx = the rows kept
    out["score"] = out[HEADS[main]]
    out = out[ok].copy()
    out.attrs["skipped"] = skipped
    out.attrs["scored_by"] = main
    return out, amaps


def score_items(df: pd.DataFrame, model_dir: Path | str, params: Params, *,
                model=None, progress: bool = False, cache=None, map_threshold: float | None = None) -> pd.DataFrame:
    """A copy of ``df``'s readable rows with ``score`` (and the per-head columns): see :func:`score_with_maps`."""
    return score_with_maps(df, model_dir, params, model=model, progress=progress, cache=cache,
                           map_threshold=map_threshold)[0]


def calibration_rows(val: pd.DataFrame, model_dir: Path | str) -> tuple[pd.DataFrame, str]:
    """The validation rows the threshold may use: every defective / unknown one, and the good ones
    the train stage left for calibration (``val_split.json``), never those that picked the epoch."""
    import json

    file = Path(model_dir) / VAL_SPLIT_FILE
    if not file.is_file():
        return val, "all validation images (model folder has no val_split.json)"
    info = json.loads(file.read_text())
    used = set(info.get("select") or [])
    keep = ~(val["item_id"].astype(str).isin(used) & (val["label"] == "good"))
    return val[keep], (f"{int((~keep).sum())} good val images that picked the epoch are left out "
                       f"(train.selection: {info.get('selection')})")


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
          model=None, progress: bool = False, map_threshold: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``df``'s rows, mark ``pred_defect``, and decide per product: (scored rows, verdicts)."""
    scored = score_items(df, model_dir, params, model=model, progress=progress, map_threshold=map_threshold)
    scored["pred_defect"] = scored["score"] >= threshold
    return scored, product_verdicts(scored, threshold)
