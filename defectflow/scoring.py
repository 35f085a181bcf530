"""A trained model folder's heads, image scores, and per-product verdicts.

Two heads (``train.head``): ``image`` (:mod:`defectflow.image_head`: ``model.pt`` + ``density.onnx``,
DifferNet-style on pooled features) and ``conv`` (:mod:`defectflow.conv_head`: ``conv.pt`` +
``conv.onnx``, fully convolutional on unpooled maps -> anomaly maps -> image score from the map's
cells). Scoring runs without torch in the loop: the backbone and both heads are ONNX Runtime
sessions (a folder without the ONNX files falls back to torch). With both heads the backbone runs
once per image and rotation: the conv head reads the maps of the unrotated pass.

Every head in the model folder is scored into its :data:`HEADS` column. ``score`` is the
``train.score_from`` head's, or ``fused``: the weighted mean (``train.image_weight``) of both heads' scores, each standardised by
the mean / std of its scores on the good validation images (``fusion.json``, written by the
train stage), so ``score`` is in "good-image standard deviations". A folder with one
head scores with it. The conv head also fills ``map_mean`` and, given a map threshold, ``map_area``
and ``n_boxes``; :func:`score_with_maps` also hands back the maps.

>>> scored = score_items(df, "models/model", params)         # doctest: +SKIP
>>> verdicts = product_verdicts(scored, threshold=1.23)        # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from defectflow.config import Params
from defectflow.conv_head import ConvHead, extract_maps, load_conv_head, map_extractor  # noqa: F401 (re-exported)
from defectflow.features import iter_decoded, prepare
from defectflow.image_head import LoadedModel, export_head, load_model, save_model  # noqa: F401 (re-exported)
from defectflow.manifest import VERDICTS
from defectflow.model_files import (CONV_FILE, CONV_HEAD_FILE, FUSION_FILE, HEAD_FILE, HEADS,  # noqa: F401
                                    MODEL_FILE, MODEL_FORMAT, VAL_SPLIT_FILE, ModelError)


# ------------------------------------------------------------------ both heads, one backbone pass
def fusion_stats(scores: dict[str, np.ndarray], source: str, image_weight: float | None = None) -> dict:
    """``fusion.json``: mean / std of each head's scores on good images (``source`` says which) and, with both
    heads and ``image_weight``, each head's weight in the fused score."""
    out = {"source": source, "heads": {}}
    for head, s in scores.items():
        s = np.asarray(s, np.float64)
        s = s[np.isfinite(s)]
        if len(s) < 2:
            raise ModelError(f"fusion needs at least 2 good images scored by the {head} head, got {len(s)}")
        out["heads"][head] = {"mean": float(s.mean()), "std": float(max(s.std(ddof=1), 1e-9)), "n": int(len(s))}
    if image_weight is not None and set(out["heads"]) == {"image", "conv"}:
        out["weights"] = {"image": float(image_weight), "conv": 1.0 - float(image_weight)}
    return out


def fusion_weights(stats: dict) -> dict[str, float]:
    """Each head's weight in the fused score (``fusion.json``; folders written before weights: equal)."""
    heads = list(stats["heads"])
    return stats.get("weights") or {h: 1.0 / len(heads) for h in heads}


def fuse(cols: dict, stats: dict) -> np.ndarray:
    """The fused score: weighted mean over heads of each head's score standardised by ``stats`` (``fusion.json``)."""
    w = fusion_weights(stats)
    return sum(w[h] * (np.asarray(cols[HEADS[h]], np.float64) - v["mean"]) / v["std"]
               for h, v in stats["heads"].items())


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
                    map_threshold: float | None = None, chunk: int = 32,
                    map_sink=None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Score ``df``'s rows with every head of the model: (a copy of the readable rows with ``score``,
    the :data:`HEADS` columns and the conv head's map summary; the conv head's anomaly maps
    ``(n, H, W)`` of those rows when ``keep_maps`` and the model has a conv head, else None).
    ``model``: a :class:`Heads` or, for the image head alone, a :class:`LoadedModel`.
    ``map_sink(positions, columns, maps)``: with a conv head, called per batch of ``chunk`` images with
    their positions in ``df``, their score columns and their anomaly maps, which are then not kept
    (memory does not grow with the rows).

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
            got, amaps = heads.score_images(images, params, keep_maps=keep_maps or map_sink is not None,
                                            map_threshold=map_threshold)
            for name, vals in got.items():
                cols.setdefault(name, []).append(vals)
            if map_sink is not None:
                map_sink(np.asarray(idx), got, amaps)
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
