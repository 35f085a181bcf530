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
convolutional density model on unpooled feature maps (``conv.pt`` + ``conv.onnx``,
:mod:`defectflow.density.conv`): per-position NLL -> anomaly map at ``train.image_size``
(:mod:`defectflow.anomaly_maps`) -> image score (``maps.score``). With both heads the backbone runs
once per image and rotation: the conv head reads the maps of the unrotated pass.

Every head in the model folder is scored into its :data:`HEADS` column. ``score`` is the
``train.score_from`` head's, or ``fused``: the mean of both heads' scores, each standardised by
the mean / std of its scores on the good validation images (``fusion.json``, written by the
train stage), so ``score`` is in "good-image standard deviations". A folder with one
head scores with it. The conv head also fills ``map_mean`` and, given a map threshold, ``map_area``
and ``n_boxes``; :func:`score_with_maps` also hands back the maps.

>>> scored = score_items(df, "models/model", params)         # doctest: +SKIP
>>> verdicts = product_verdicts(scored, threshold=1.23)        # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from defectflow.config import Params
from defectflow.density import DensityConfig, DensityModel
from defectflow.errors import DefectflowError
from defectflow.features import FeatureExtractor, iter_decoded, ort_session, prepare
from defectflow.manifest import VERDICTS

MODEL_FILE = "model.pt"
HEAD_FILE = "density.onnx"
VAL_SPLIT_FILE = "val_split.json"
CONV_FILE = "conv.pt"
CONV_HEAD_FILE = "conv.onnx"
FUSION_FILE = "fusion.json"
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
            self._head = _ort_session(file, threads, "density head") if file is not None and file.is_file() else False
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


# ------------------------------------------------------------------ conv head
def map_extractor(features: dict, params: Params):
    """The :class:`~defectflow.anomaly_maps.MapExtractor` of a conv head's ``features`` (from its meta or
    from ``MapExtractor.describe()`` + pretrained / weights)."""
    from defectflow.anomaly_maps import MapExtractor

    return MapExtractor(features["backbone"], image_size=features["image_size"], levels=features["levels"],
                        pretrained=features.get("pretrained", params.train.pretrained),
                        weights=params.train.weights or features.get("weights"), threads=params.train.threads,
                        input_norm=features.get("input_norm", "none"))


def extract_maps(fx, paths, on_bad_image: str = "error", chunk: int = 64, progress: bool = False,
                 desc: str = "maps") -> tuple[list[np.ndarray], np.ndarray, list]:
    """Unpooled backbone maps of image files, one rotation: (``[(n_ok, C_i, h_i, w_i)]``, ok mask ``(N,)``,
    skipped ``(path, error)``). Unreadable images stop (``error``) or are left out (``skip``)."""
    paths = list(paths)
    ok = np.zeros(len(paths), bool)
    skipped: list = []
    parts: list[list[np.ndarray]] = [[] for _ in fx.levels]
    batches = iter_decoded(paths, fx.image_size, threads=fx.threads, batch_size=chunk, on_bad_image=on_bad_image)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(paths) // chunk), desc=desc, unit="chunk", leave=False)
    for idx, images, sk in batches:
        skipped += sk
        ok[idx] = True
        if images:
            for k, m in enumerate(fx.maps(images)):
                parts[k].append(m)
    maps = [np.concatenate(p) if p else np.zeros((0, c, 1, 1), np.float32) for p, c in zip(parts, fx.channels)]
    return maps, ok, skipped


def _ort_session(file: Path, threads: int, what: str):
    try:
        return ort_session(file, threads, blocked_layout=False)
    except Exception as err:
        raise ModelError(f"{file}: unreadable ONNX {what} ({err}); retrain or delete it") from None


@dataclass
class ConvHead:
    """A trained conv head (``conv.pt`` and its ONNX export ``conv.onnx``): the density model and its
    meta (features, best epochs). Scores run in ONNX Runtime when ``conv.onnx`` is there, else torch."""
    model: object                       # defectflow.density.conv.ConvFlow
    meta: dict
    path: Path
    _fx: object = None
    _session: object = None

    @property
    def image_size(self) -> int:
        return int(self.meta["features"]["image_size"])

    @property
    def levels(self) -> list[int]:
        return list(self.meta["features"]["levels"])

    def extractor(self, params: Params):
        """Its own ONNX Runtime backbone session (not needed when it shares the image head's pass)."""
        if self._fx is None:
            f = self.meta.get("features") or {}
            fx = map_extractor(f, params)
            if fx.weights_id != f.get("weights_id"):
                raise ModelError(f"{self.path}: backbone weights differ from training "
                                 f"({fx.weights_id} now, {f.get('weights_id')} then): retrain the model")
            self._fx = fx
        return self._fx

    def session(self, threads: int = 2):
        if self._session is None:
            file = self.path.parent / CONV_HEAD_FILE
            self._session = _ort_session(file, threads, "conv head") if file.is_file() else False
        return self._session or None

    def nll_maps(self, feature_maps: Sequence[np.ndarray], threads: int = 2,
                 backend: str = "auto", batch_size: int = 32) -> list[np.ndarray]:
        """``-log p / C`` per position per group ``[(N, h_g, w_g)]`` (nats per channel) of backbone maps,
        in batches of ``batch_size`` images (cache-sized: a whole set at once ran 15% slower)."""
        sess = self.session(threads) if backend in ("auto", "onnx") else None
        if sess is None:
            return [t.numpy() for t in self.model.nll_per_dim_maps(feature_maps, batch_size)]
        parts = [sess.run(None, {f"map{k}": np.ascontiguousarray(m[i:i + batch_size], np.float32)
                                 for k, m in enumerate(feature_maps)})
                 for i in range(0, len(feature_maps[0]), batch_size)]
        if not parts:
            return [np.zeros((0, *feature_maps[g[0]].shape[2:]), np.float32) for g in self.model.config.group_inputs]
        return [-np.concatenate([p[k] for p in parts]) / c for k, c in enumerate(self.model.channels)]

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The backbone levels of each of the model's groups (one level each, or merged levels)."""
        return [tuple(self.levels[i] for i in g) for g in self.model.config.group_inputs]

    def map_levels(self, params: Params) -> Optional[list[int]]:
        """Positions (in the head's groups) of the groups that make the shown map: those with a level in
        ``maps.levels``; None = all."""
        have = self.levels
        want = params.maps.levels
        if want is None or list(want) == have:
            return None
        if not set(want) <= set(have):
            raise ModelError(f"{self.path}: maps.levels {list(want)} are not all among the conv head's levels "
                             f"{have}: change maps.levels or retrain")
        shown = [k for k, g in enumerate(self.groups) if set(g) & set(want)]
        return None if len(shown) == len(self.groups) else shown

    def summarise(self, feature_maps: Sequence[np.ndarray], params: Params, keep: bool = True,
                  map_threshold: float | None = None) -> tuple[np.ndarray | None, dict]:
        """Anomaly maps at ``train.image_size`` of ``maps.levels`` (if ``keep``) and the per-image columns
        ``score_conv`` (:func:`~defectflow.anomaly_maps.cell_scores` of the shown groups' cells, without
        ``maps.border`` cells at each edge), ``map_mean`` and, given a map threshold, ``map_area`` and
        ``n_boxes``."""
        from defectflow.anomaly_maps import boxes_from_map, cell_scores, combine_levels, to_image_size

        mp = params.maps
        size = (self.image_size,) * 2
        nll = self.nll_maps(feature_maps, params.train.threads)
        shown = self.map_levels(params)
        chosen = nll if shown is None else [nll[i] for i in shown]
        grid = combine_levels(chosen, size, mp.sigma)          # on the map grid; upsampled only when needed
        cols = {"score_conv": cell_scores(chosen, mp.score, mp.top_fraction, mp.border),
                "map_mean": grid.reshape(len(grid), -1).mean(axis=1).astype(np.float64)}
        amaps = to_image_size(grid, size) if keep or map_threshold is not None else None
        if map_threshold is not None:
            cols["map_area"] = (amaps >= map_threshold).reshape(len(amaps), -1).mean(axis=1)
            cols["n_boxes"] = np.array([len(boxes_from_map(a, map_threshold, min_area=mp.min_area)) for a in amaps],
                                       np.int64)
        return (amaps if keep else None), cols


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


# ------------------------------------------------------------------ both heads, one backbone pass
def fusion_stats(scores: dict[str, np.ndarray], source: str) -> dict:
    """``fusion.json``: mean / std of each head's scores on good images (``source`` says which)."""
    out = {"source": source, "heads": {}}
    for head, s in scores.items():
        s = np.asarray(s, np.float64)
        s = s[np.isfinite(s)]
        if len(s) < 2:
            raise ModelError(f"fusion needs at least 2 good images scored by the {head} head, got {len(s)}")
        out["heads"][head] = {"mean": float(s.mean()), "std": float(max(s.std(ddof=1), 1e-9)), "n": int(len(s))}
    return out


def fuse(cols: dict, stats: dict) -> np.ndarray:
    """The fused score: mean over heads of each head's score standardised by ``stats`` (``fusion.json``)."""
    z = [(np.asarray(cols[HEADS[h]], np.float64) - v["mean"]) / v["std"] for h, v in stats["heads"].items()]
    return np.mean(z, axis=0)


@dataclass
class Heads:
    """The heads of one model folder (``None`` where not trained) and the fusion statistics."""
    image: Optional[LoadedModel] = None
    conv: Optional[ConvHead] = None
    model_dir: Optional[Path] = None
    fusion: Optional[dict] = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in ("image", "conv") if getattr(self, n) is not None)

    def scored_by(self, params: Params) -> str:
        """What ``score`` is: ``train.score_from`` (image | conv | fused) with both heads, else the only head."""
        if len(self.names) == 1:
            return self.names[0]
        want = params.train.score_from
        if want == "fused" and self.fusion is None:
            raise ModelError(f"{self.model_dir}: train.score_from is fused but the model has no {FUSION_FILE} "
                             "(trained before score fusion): retrain, or set train.score_from image or conv")
        return want

    def shares_pass(self, params: Params) -> bool:
        """True when the conv head's maps come out of the image head's full-size backbone pass."""
        if self.image is None or self.conv is None:
            return False
        f, c = self.image.features, self.conv.meta.get("features") or {}
        return (1.0 in tuple(f["scales"]) and f["backbone"] == c.get("backbone")
                and f["image_size"] == c.get("image_size") and f["weights_id"] == c.get("weights_id")
                and f.get("input_norm", "none") == c.get("input_norm", "none"))

    def score_images(self, images: Sequence[np.ndarray], params: Params, *, keep_maps: bool = False,
                     map_threshold: float | None = None, chunk: int = 32) -> tuple[dict, np.ndarray | None]:
        """Score decoded float RGB images (at ``train.image_size``) with every head: (columns of
        :data:`HEADS` scores, ``score`` and the conv map summary, anomaly maps or None).

        The backbone runs once per image and rotation: the image head pools every pass, the conv
        head reads the unrotated pass's maps (when both heads use the same backbone input). Images
        go through in chunks of ``chunk``, so a chunk's maps are still in cache for the heads.
        """
        if len(images) > chunk:
            parts = [self.score_images(images[i:i + chunk], params, keep_maps=keep_maps, map_threshold=map_threshold,
                                       chunk=chunk) for i in range(0, len(images), chunk)]
            cols = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
            return cols, (np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None)
        tp = params.train
        cols: dict[str, np.ndarray] = {}
        conv_maps = None
        if self.image is not None:
            fx = self.image.extractor(params)
            t_count = tp.n_transforms_test
            inputs = prepare(images, t_count, fx.image_size, fx.scales)
            shared = self.shares_pass(params)
            pooled = []
            for net, x, scale in zip(fx.nets, inputs, fx.scales):
                if shared and scale == 1.0 and conv_maps is None:
                    # rows i * T are the unrotated images: their pass also hands its maps to the conv head
                    names = [net.map_names[lv] for lv in self.conv.levels] + ["pooled"]
                    outs = net.outputs(x[::t_count], names, fx.batch_size)
                    conv_maps = outs[:-1]
                    p = np.empty((len(x), outs[-1].shape[1]), np.float32)
                    p[::t_count] = outs[-1]
                    for t in range(1, t_count):          # strided views: no copy of the whole input
                        p[t::t_count] = net.outputs(x[t::t_count], ["pooled"], fx.batch_size)[0]
                    pooled.append(p)
                else:
                    pooled.append(net.outputs(x, ["pooled"], fx.batch_size)[0])
            feats = np.concatenate(pooled, axis=1).reshape(len(images), t_count, fx.dim)
            cols[HEADS["image"]] = self.image.score_features(feats, tp.threads)
        amaps = None
        if self.conv is not None:
            if conv_maps is None:
                conv_maps = self.conv.extractor(params).maps(images)
            amaps, conv_cols = self.conv.summarise(conv_maps, params, keep_maps, map_threshold)
            cols.update(conv_cols)
        main = self.scored_by(params)
        cols["score"] = fuse(cols, self.fusion) if main == "fused" else cols[HEADS[main]]
        return cols, amaps


def load_heads(model_dir: Path | str) -> Heads:
    """Every head in ``model_dir``: ``model.pt`` (image) and/or ``conv.pt`` (conv), and ``fusion.json``;
    errors name the folder."""
    import json

    d = Path(model_dir)
    image = load_model(d) if (d / MODEL_FILE).is_file() else None
    conv = load_conv_head(d) if (d / CONV_FILE).is_file() else None
    if image is None and conv is None:
        raise ModelError(f"{d}: no model found ({MODEL_FILE} or {CONV_FILE}; has the train stage run?)")
    fusion = None
    if (d / FUSION_FILE).is_file():
        try:
            fusion = json.loads((d / FUSION_FILE).read_text())
            assert all({"mean", "std"} <= set(v) for v in fusion["heads"].values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ModelError(f"{d / FUSION_FILE}: unreadable fusion statistics; retrain") from None
    return Heads(image, conv, d, fusion)


def score_with_maps(df: pd.DataFrame, model_dir: Path | str, params: Params, *, model=None,
                    progress: bool = False, cache=None, keep_maps: bool = False,
                    map_threshold: float | None = None, chunk: int = 32) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Score ``df``'s rows with every head of the model: (a copy of the readable rows with ``score``,
    the :data:`HEADS` columns and the conv head's map summary; the conv head's anomaly maps
    ``(n, H, W)`` of those rows when ``keep_maps`` and the model has a conv head, else None).
    ``model``: a :class:`Heads` or, for the image head alone, a :class:`LoadedModel`.

    The image head alone reads the feature cache; with a conv head every image is decoded once and
    goes through one backbone pass per rotation (:meth:`Heads.score_images`), ``chunk`` at a time.
    """
    heads = (model if isinstance(model, Heads) else
             Heads(image=model, model_dir=Path(model_dir)) if isinstance(model, LoadedModel) else load_heads(model_dir))
    main = heads.scored_by(params)
    out = df.copy()
    for col in ["score", *(HEADS[h] for h in heads.names)]:
        out[col] = pd.Series(np.nan, index=out.index, dtype="float64")
    out.attrs["scored_by"] = main
    out.attrs["skipped"] = []
    if len(df) == 0:
        return out, (np.zeros((0, 1, 1), np.float32) if keep_maps and heads.conv is not None else None)
    paths = df["image_path"].tolist()
    tp = params.train
    ok = np.zeros(len(df), bool)
    skipped: list = []
    if heads.conv is None:
        fx = heads.image.extractor(params, cache=cache)
        feats = fx.extract(paths, tp.n_transforms_test, progress=progress, desc="score", on_bad_image=tp.on_bad_image)
        ok = ~np.isnan(feats).any(axis=(1, 2))
        skipped += list(fx.skipped)
        out.loc[out.index[ok], HEADS["image"]] = heads.image.score_features(feats[ok], tp.threads)
        out["score"] = out[HEADS["image"]]
        amaps = None
    else:
        size = heads.conv.image_size
        batches = iter_decoded(paths, size, threads=tp.threads, batch_size=chunk, on_bad_image=tp.on_bad_image)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, total=-(-len(paths) // chunk), desc="score", unit="chunk", leave=False)
        cols: dict[str, list] = {}
        kept: list[np.ndarray] = []
        for idx, images, sk in batches:
            skipped += sk
            ok[idx] = True
            if not images:
                continue
            got, amaps = heads.score_images(images, params, keep_maps=keep_maps, map_threshold=map_threshold)
            for name, vals in got.items():
                cols.setdefault(name, []).append(vals)
            if keep_maps:
                kept.append(amaps)
        rows = out.index[ok]
        for name, parts in cols.items():
            vals = np.concatenate(parts)
            if name == "n_boxes":
                out[name] = pd.array([None] * len(out), dtype="Int64")
            out.loc[rows, name] = vals
        amaps = (np.concatenate(kept) if kept else np.zeros((0, size, size), np.float32)) if keep_maps else None
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
    the train stage left for calibration (``val_split.json``), never those that picked the epoch or
    standardised the heads' scores."""
    import json

    file = Path(model_dir) / VAL_SPLIT_FILE
    if not file.is_file():
        return val, "all validation images (model folder has no val_split.json)"
    info = json.loads(file.read_text())
    n_sel, n_std = len(info.get("select") or []), len(info.get("standardise") or [])
    used = set(info.get("select") or []) | set(info.get("standardise") or [])
    keep = ~(val["item_id"].astype(str).isin(used) & (val["label"] == "good"))
    return val[keep], (f"{int((~keep).sum())} good val images are left out: {n_sel} picked the epoch, "
                       f"{n_std} standardised the heads' scores (train.selection: {info.get('selection')})")


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
