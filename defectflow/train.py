"""Train stage: fit the density model on backbone features of good training images.

Reads ``inp/manifest.parquet`` (SYNTH schema) and writes into ``out_dir`` (atomically):

- ``model.pt``         the scorer (see :mod:`defectflow.scoring`)
- ``card.json``        params used, n_train, timings, final and best losses
- ``train_loss.csv``   ``epoch,train_nll,val_nll`` per epoch (DVC plots)

- ``val_split.json``   which good validation images picked the epoch (``select``), standardised
                       the heads' scores (``standardise``) and are left to calibrate the threshold
                       (``calibrate``)
- ``density.onnx``     the density head alone (pooled features in, score out) for ONNX Runtime
- ``conv.pt``          the conv head (``train.head: conv | both``): fully convolutional density model
                       on unpooled maps of ``train.conv.levels``, one rotation per image; per level the
                       epoch with the lowest selection-part val NLL; ``conv_loss.csv`` its curve;
                       ``conv.onnx`` its ONNX export (maps in, log-likelihood maps out);
                       ``memory.npy`` its patch memory (``train.conv.memory`` > 0: coreset of the
                       training patches, :mod:`defectflow.density.memory`)
- ``fusion.json``      both heads: mean / std of each head's scores on the standardisation part of
                       the good validation images, for ``train.score_from: fused``

``model.pt``, ``density.onnx`` are written for ``train.head: image | both``; ``card.json`` has a
``heads`` list and a ``conv`` section when the conv head is trained.

Training rows: ``split == train`` and ``label == good`` -- every window frame, augmented
copy and synthetic image. Each gives ``train.n_transforms`` rotated feature vectors.
Validation rows (``split == val``, good, ``is_center`` originals) are split, seeded, into a
*selection* part (``train.select_fraction``: its NLL picks the epoch and stops training), with
fusion a *standardisation* part (``train.standardise_fraction``: ``fusion.json``), and a
*calibration* part that the threshold stage uses alone -- so the images that chose the epoch or
scaled the scores never also set the threshold (reused images make good images score lower on
validation than anywhere else, and the false-alarm rate fitted there does not hold).
``train.selection: last_epoch`` trains every epoch and picks with no val image.
Test rows are never read. Backbone features come from the on-disk feature cache when present.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from defectflow.config import Params
from defectflow.density import FitConfig, fit_density
from defectflow.errors import DefectflowError
from defectflow.features import FeatureExtractor
from defectflow.manifest import SYNTH, read_manifest
from defectflow.model_files import MEMORY_FILE
from defectflow.scoring import (CONV_FILE, CONV_HEAD_FILE, FUSION_FILE, HEAD_FILE, HEADS, MODEL_FILE,
                                VAL_SPLIT_FILE, export_head, extract_maps, fusion_stats, map_extractor,
                                save_model, score_with_maps, select_rows)
from defectflow.stage import StageReport, logger, manifest_path, stage_run

log = logger("train")


class TrainError(DefectflowError):
    """Training cannot run on this input."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["split"] == "train") & (df["label"] == "good")]


def validation_rows(df: pd.DataFrame) -> pd.DataFrame:
    val = select_rows(df, "val")
    return val[val["label"] == "good"]


MIN_CALIBRATE = 2
MIN_STANDARDISE = 2


def split_validation(val_df: pd.DataFrame, seed: int, select_fraction: float, selection: str,
                     origin: str = "validation", standardise_fraction: float = 0.0
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(selection, standardisation, calibration) rows of the good validation rows, seeded and
    order-independent: three disjoint parts, so the images that pick the epoch, those that scale the
    heads' scores (``standardise_fraction``, 0 without fusion) and those that set the threshold are
    never the same.

    Raises TrainError when the split is too small: selection needs 1 image (when asked for),
    standardisation :data:`MIN_STANDARDISE` (a std) and calibration :data:`MIN_CALIBRATE` (the threshold
    stage's minimum).
    """
    n = len(val_df)
    want_sel = selection != "last_epoch"
    n_min_std = MIN_STANDARDISE if standardise_fraction > 0 else 0
    need = MIN_CALIBRATE + int(want_sel) + n_min_std
    if n < need:
        raise TrainError(f"{origin}: {n} good validation image(s) (split=val, is_center); need at least {need} "
                         f"({'1 to pick the epoch, ' if want_sel else ''}"
                         f"{f'{n_min_std} to standardise the heads, ' if n_min_std else ''}"
                         f"{MIN_CALIBRATE} to calibrate the threshold): raise source.val_fraction, add good images"
                         + (", or set train.selection: last_epoch" if want_sel else ""))
    n_sel = min(max(int(round(n * select_fraction)), 1), n - need + 1) if want_sel else 0
    n_std = (min(max(int(round(n * standardise_fraction)), n_min_std), n - n_sel - MIN_CALIBRATE)
             if n_min_std else 0)
    ordered = val_df.sort_values("item_id", kind="stable")
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.split(perm, [n_sel, n_sel + n_std])
    return tuple(ordered.iloc[np.sort(p)] for p in parts)


def _pooled_features(fx: FeatureExtractor, df: pd.DataFrame, n_transforms: int, on_bad_image: str,
                     skipped: list, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Features of ``df``'s images; unreadable ones (on_bad_image: skip) are noted and left out."""
    feats = fx.extract(df["image_path"], n_transforms, progress=True, desc=f"{what} features",
                       on_bad_image=on_bad_image)
    _note_skipped(skipped, fx.skipped, what)
    ok = ~np.isnan(feats).any(axis=(1, 2)) if len(feats) else np.zeros(0, bool)
    return df[ok], feats[ok]


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    src = manifest_path(inp)
    df = read_manifest(src, SYNTH)
    tp = params.train
    train_df, val_df = training_rows(df), validation_rows(df)
    if train_df.empty:
        raise TrainError(f"{src}: no good training images (rows with split=train and label=good); "
                         "check the source's splits and labels")
    if tp.image_size == "auto":
        from defectflow.image_io import auto_image_size
        size = auto_image_size(train_df["image_path"])
        log.info("train.image_size auto: %d px (median short side of the training images)", size)
        tp = tp.model_copy(update={"image_size": size})
        params = params.model_copy(update={"train": tp})
    fused = len(tp.heads) == 2          # fusion.json is written whenever both heads are: score_from may change later
    sel_df, std_df, cal_df = split_validation(val_df, params.seed, tp.select_fraction, tp.selection, str(src),
                                              tp.standardise_fraction if fused else 0.0)
    with stage_run("train", out_dir) as (out, report):
        t0 = time.perf_counter()
        seed_everything(params.seed)
        torch.set_num_threads(tp.threads)
        skipped: list = []
        card = {"params": {"seed": params.seed, "train": tp.model_dump(mode="json")}, "heads": list(tp.heads),
                "scored_by": tp.scored_by}
        if "image" in tp.heads:
            train_df, sel_df = _train_image_head(params, src, train_df, sel_df, cal_df, val_df, out, report,
                                                 card, skipped)
        if "conv" in tp.heads:
            train_df, sel_df = _train_conv_head(params, src, train_df, sel_df, out, report, card, skipped)
        if fused:
            _write_fusion(params, std_df, out, report, card)
        selection = ((f"epoch with the lowest NLL on {len(sel_df)} good val images (selection part)"
                      if len(sel_df) else f"last epoch (train.selection: {tp.selection})")
                     + (f"; {len(std_df)} other good val images standardise the heads' scores" if len(std_df) else "")
                     + f"; {len(cal_df)} other good val images calibrate the threshold")
        card.update({"model_selection": selection, "n_train_images": int(len(train_df)),
                     "n_val_images": int(len(val_df)), "n_val_select": int(len(sel_df)),
                     "n_val_standardise": int(len(std_df)), "n_val_calibrate": int(len(cal_df)),
                     "skipped_images": [{"path": p, "error": m} for p, m in skipped]})
        split_file, _ = out.path(VAL_SPLIT_FILE)
        split_file.write_text(json.dumps({"selection": tp.selection, "seed": params.seed,
                                          "select": sorted(sel_df["item_id"].astype(str)),
                                          "standardise": sorted(std_df["item_id"].astype(str)),
                                          "calibrate": sorted(cal_df["item_id"].astype(str))}, indent=2) + "\n")
        card["train_seconds"] = round(time.perf_counter() - t0, 2)
        card["card_seconds"] = card["train_seconds"]
        card_file, _ = out.path("card.json")
        card_file.write_text(json.dumps(card, indent=2) + "\n")

        report.read.append(str(src))
        report.wrote += [str(Path(out_dir) / n) for n in (VAL_SPLIT_FILE, "card.json", "train_loss.csv")]
        report.n_in, report.n_out = len(df), len(train_df)
        report.notes.append(f"heads: {', '.join(tp.heads)}; the image score comes from the {tp.scored_by} head")
        report.notes.append(f"model selection: {selection}")
        if skipped:
            report.notes.append(f"skipped {len(skipped)} unreadable image(s) (train.on_bad_image: skip): "
                                + "; ".join(p for p, _ in skipped))
    return report


def _train_image_head(params: Params, src: Path, train_df, sel_df, cal_df, val_df, out, report, card: dict,
                      skipped: list):
    """The DifferNet-style head: pooled features (rotations) -> coupling blocks -> ``model.pt`` + ONNX head."""
    tp = params.train
    t0 = time.perf_counter()
    fx = FeatureExtractor.from_params(tp)
    train_df, train_feats = _pooled_features(fx, train_df, tp.n_transforms, tp.on_bad_image, skipped, "train")
    if train_df.empty:
        raise TrainError(f"{src}: every good training image was unreadable (train.on_bad_image: skip)")
    val_feats = None
    if len(sel_df):
        sel_df, val_feats = _pooled_features(fx, sel_df, tp.n_transforms_test, tp.on_bad_image, skipped, "val")
        if sel_df.empty:
            raise TrainError(f"{src}: no readable validation image left to pick the epoch")
    t_feat = time.perf_counter() - t0
    cfg = FitConfig(n_blocks=tp.n_coupling_blocks, hidden=tp.hidden, clamp=tp.clamp, epochs=tp.epochs,
                    batch_size=tp.batch_size, lr=tp.lr, weight_decay=tp.weight_decay, seed=params.seed,
                    features_per_scale=tp.features_per_scale, n_scales=len(tp.scales),
                    patience=tp.patience if val_feats is not None else None)
    torch.set_num_threads(tp.fit_threads)
    result = fit_density(train_feats.reshape(-1, fx.dim), val_feats, cfg, progress=True)
    torch.set_num_threads(tp.threads)
    card.update({
        "features": fx.describe(),
        "n_train_vectors": int(len(train_df) * tp.n_transforms),
        "n_train_synthetic": int(train_df["synthetic"].fillna(False).astype(bool).sum()),
        "n_train_augmented": int(train_df["augment_of"].notna().sum()) if "augment_of" in train_df else 0,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "final_train_nll": result.final_train_nll,
        "selected_train_nll": result.history[result.best_epoch - 1]["train_nll"],
        "best_val_nll": result.best_val_nll,
        "density_params": int(sum(p.numel() for p in result.model.parameters())),
        "feature_seconds": round(t_feat, 2),
        "fit_seconds": round(result.seconds, 2),
        "image_head_seconds": round(time.perf_counter() - t0, 2),
        "loss": "mean NLL per feature dim, nats (0.5|z|^2 + 0.5 log 2pi - log|det J| per dim)",
    })
    model_file, _ = out.path(MODEL_FILE)
    save_model(model_file, result.model, fx, params,
               extra={"best_epoch": result.best_epoch, "n_train_images": int(len(train_df))})
    head_file, _ = out.path(HEAD_FILE)
    export_head(result.model, head_file, tp.n_transforms_test)
    loss_file, _ = out.path("train_loss.csv")
    pd.DataFrame(result.history, columns=["epoch", "train_nll", "val_nll"]).to_csv(loss_file, index=False)
    report.wrote += [str(Path(out.final) / n) for n in (MODEL_FILE, HEAD_FILE)]
    report.notes.append(f"image head: {len(train_df)} good images x {tp.n_transforms} rotations "
                        f"({fx.dim}-dim {tp.backbone} features); epoch {result.best_epoch} of "
                        f"{len(result.history)} run (max {tp.epochs}), train NLL {result.final_train_nll:.4f}, "
                        f"best val NLL {result.best_val_nll}")
    return train_df, sel_df


def _train_conv_head(params: Params, src: Path, train_df, sel_df, out, report, card: dict, skipped: list):
    """The fully convolutional head: unpooled maps (one rotation) -> per-level conv density model -> ``conv.pt``."""
    from defectflow.density.conv import export_onnx as export_conv_onnx, save_conv_flow
    from defectflow.density.conv_fit import ConvFitConfig, fit_conv_flow

    tp, cp = params.train, params.train.conv
    t0 = time.perf_counter()
    fx = map_extractor({"backbone": tp.backbone, "image_size": tp.image_size, "levels": list(cp.levels),
                        "pretrained": tp.pretrained, "weights": tp.weights, "input_norm": tp.input_norm}, params)
    tr, ok, sk = extract_maps(fx, train_df["image_path"].tolist(), tp.on_bad_image, progress=True, desc="train maps")
    _note_skipped(skipped, sk, "train")
    train_df = train_df[ok]
    if len(train_df) < 2:
        raise TrainError(f"{src}: the conv head needs at least 2 readable good training images, got {len(train_df)}")
    va = None
    if len(sel_df):
        va, ok, sk = extract_maps(fx, sel_df["image_path"].tolist(), tp.on_bad_image, progress=True,
                                  desc="val maps")
        _note_skipped(skipped, sk, "val")
        sel_df = sel_df[ok]
        if sel_df.empty:
            raise TrainError(f"{src}: no readable validation image left to pick the epoch")
    t_maps = time.perf_counter() - t0
    cfg = ConvFitConfig(n_blocks=cp.n_blocks, hidden_ratio=cp.hidden_ratio, kernels=tuple(cp.kernels),
                        subnet=cp.subnet, clamp=cp.clamp, epochs=cp.epochs, batch_size=cp.batch_size, lr=cp.lr,
                        weight_decay=cp.weight_decay, seed=params.seed, threads=tp.fit_threads,
                        groups=tuple(cp.groups()), local_average=cp.local_average, temper=cp.temper,
                        merge_mode=cp.merge_mode, context_channels=cp.context_channels)
    torch.manual_seed(params.seed)
    res = fit_conv_flow(tr, va, cfg, progress=True)
    del va
    memory = _fit_memory(tr, cp, params.seed, out)
    del tr
    features = {**fx.describe(), "pretrained": bool(tp.pretrained), "weights": tp.weights}
    conv_file, _ = out.path(CONV_FILE)
    save_conv_flow(conv_file, res.model, {"features": features, "best_epoch": res.best_epoch,
                                          "history": res.history, "n_train_images": int(len(train_df))})
    export_conv_onnx(res.model, out.path(CONV_HEAD_FILE)[0], [(tp.image_size // s,) * 2 for s in fx.strides])
    names = ["+".join(str(cp.levels[i]) for i in g) for g in cp.groups()]     # "0+1": merged levels
    rows = [{"epoch": h["epoch"], "level": name, "train_nll": h["train_nll"][k],
             "val_nll": None if h["val_nll"] is None else h["val_nll"][k]}
            for h in res.history for k, name in enumerate(names)]
    loss_file, _ = out.path("conv_loss.csv")
    pd.DataFrame(rows, columns=["epoch", "level", "train_nll", "val_nll"]).to_csv(loss_file, index=False)
    if "image" not in tp.heads:            # DVC plots read train_loss.csv: the conv curve, mean over levels
        curve = pd.DataFrame(rows).groupby("epoch", as_index=False)[["train_nll", "val_nll"]].mean()
        curve.to_csv(out.path("train_loss.csv")[0], index=False)
    card["conv"] = {
        "features": features,
        "config": res.model.config.to_dict(),
        "n_train_images": int(len(train_df)),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "final_train_nll": res.history[-1]["train_nll"],
        "best_val_nll": res.best_val_nll,
        "params": int(sum(p.numel() for p in res.model.parameters())),
        "model_mb": round(conv_file.stat().st_size / 2**20, 3),
        "map_seconds": round(t_maps, 2),
        "fit_seconds": round(res.seconds, 2),
        "fit_threads": tp.fit_threads,
        "loss": "mean NLL per channel per position, nats, per level (train.conv.levels)",
    }
    if memory is not None:
        card["conv"]["memory"] = memory
    report.wrote += [str(Path(out.final) / n) for n in (CONV_FILE, CONV_HEAD_FILE, "conv_loss.csv")]
    report.notes.append(f"conv head: {len(train_df)} good images, levels {list(cp.levels)} "
                        f"(strides {fx.strides}) modelled as groups {names} (local average {cp.local_average}, "
                        f"temper {cp.temper}), best epochs {res.best_epoch} of {cp.epochs}, "
                        f"{card['conv']['model_mb']} MB, {res.seconds:.1f} s fit"
                        + (f"; patch memory {memory['patches']} of {memory['of']} training patches "
                           f"({memory['seconds']} s)" if memory else ""))
    return train_df, sel_df


def _fit_memory(maps: list[np.ndarray], cp, seed: int, out) -> dict | None:
    """The conv head's patch memory (``train.conv.memory`` coreset patches of the good training maps) ->
    ``memory.npy``; its card entry, or None when off."""
    from defectflow.density.memory import PatchMemory, patch_maps

    if cp.memory <= 0:
        return None
    t0 = time.perf_counter()
    n, (h, w) = len(maps[0]), max((m.shape[2:] for m in maps), key=lambda s: s[0] * s[1])
    patches = np.empty((n, h, w, sum(m.shape[1] for m in maps)), np.float32)     # one copy, filled in chunks
    with torch.no_grad():
        for i in range(0, n, 32):
            part = patch_maps([torch.from_numpy(m[i:i + 32]) for m in maps], cp.local_average).numpy()
            patches[i:i + 32] = part.transpose(0, 2, 3, 1)
    patches = patches.reshape(-1, patches.shape[-1])
    memory = PatchMemory.fit(patches, cp.memory, seed)
    memory.save(out.path(MEMORY_FILE)[0])
    return {"patches": int(len(memory.bank)), "of": int(len(patches)), "dim": memory.dim,
            "seconds": round(time.perf_counter() - t0, 1)}


def _write_fusion(params: Params, good_df: pd.DataFrame, out, report, card: dict) -> None:
    """``fusion.json``: each head's score mean / std on ``good_df`` (good validation images)."""
    from defectflow.scoring import load_heads

    heads = load_heads(out.tmp)
    single = params.model_copy(update={"train": params.train.model_copy(update={"score_from": "image"})})
    scored = score_with_maps(good_df, out.tmp, single, model=heads, progress=True)[0]
    source = (f"{len(scored)} good validation images (the standardisation part: never those that pick the epoch "
              "or calibrate the threshold, never test images)")
    stats = fusion_stats({h: scored[HEADS[h]].to_numpy() for h in heads.names}, source, params.train.image_weight)
    file, final = out.path(FUSION_FILE)
    file.write_text(json.dumps(stats, indent=2) + "\n")
    card["fusion"] = stats
    report.wrote.append(final)
    report.notes.append("fusion: " + ", ".join(f"{h} head {v['mean']:.4g} +- {v['std']:.3g}"
                                               for h, v in stats["heads"].items()) + f" on {source}")


def _note_skipped(skipped: list, new: list, what: str) -> None:
    seen = {p for p, _ in skipped}
    fresh = [s for s in new if s[0] not in seen]
    if fresh:
        log.warning("%s: skipped %d unreadable image(s): %s", what, len(fresh), "; ".join(m for _, m in fresh))
    skipped += fresh
