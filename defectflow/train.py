"""Train stage: fit the density model on backbone features of good training images.

Reads ``inp/manifest.parquet`` (SYNTH schema) and writes into ``out_dir`` (atomically):

- ``model.pt``         the scorer (see :mod:`defectflow.scoring`)
- ``card.json``        params used, n_train, timings, final and best losses
- ``train_loss.csv``   ``epoch,train_nll,val_nll`` per epoch (DVC plots)

Training rows: ``split == train`` and ``label == good`` -- every window frame, augmented
copy and synthetic image. Each gives ``train.n_transforms`` rotated feature vectors.
Validation rows (``split == val``, good, ``is_center`` originals) only pick the epoch with
the lowest validation NLL; test rows are never read.
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
from defectflow.scoring import MODEL_FILE, save_model, select_rows
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


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    src = manifest_path(inp)
    df = read_manifest(src, SYNTH)
    train_df, val_df = training_rows(df), validation_rows(df)
    if train_df.empty:
        raise TrainError(f"{src}: no good training images (rows with split=train and label=good); "
                         "check the source's splits and labels")
    tp = params.train
    with stage_run("train", out_dir) as (out, report):
        t0 = time.perf_counter()
        seed_everything(params.seed)
        torch.set_num_threads(tp.threads)
        fx = FeatureExtractor.from_params(tp)
        train_feats = fx.extract(train_df["image_path"], tp.n_transforms, progress=True, desc="train features")
        val_feats = fx.extract(val_df["image_path"], tp.n_transforms_test, progress=True, desc="val features") \
            if len(val_df) else None
        t_feat = time.perf_counter() - t0
        cfg = FitConfig(n_blocks=tp.n_coupling_blocks, hidden=tp.hidden, clamp=tp.clamp, epochs=tp.epochs,
                        batch_size=tp.batch_size, lr=tp.lr, weight_decay=tp.weight_decay, seed=params.seed)
        result = fit_density(train_feats.reshape(-1, fx.dim), val_feats, cfg, progress=True)

        card = {
            "params": {"seed": params.seed, "train": tp.model_dump(mode="json")},
            "features": fx.describe(),
            "n_train_images": int(len(train_df)),
            "n_train_vectors": int(len(train_df) * tp.n_transforms),
            "n_train_synthetic": int(train_df["synthetic"].fillna(False).astype(bool).sum()),
            "n_train_augmented": int(train_df["augment_of"].notna().sum()),
            "n_val_images": int(len(val_df)),
            "model_selection": ("epoch with the lowest validation NLL (good val images)" if len(val_df)
                                else "last epoch (no validation images)"),
            "best_epoch": result.best_epoch,
            "final_train_nll": result.final_train_nll,
            "selected_train_nll": result.history[result.best_epoch - 1]["train_nll"],
            "best_val_nll": result.best_val_nll,
            "density_params": int(sum(p.numel() for p in result.model.parameters())),
            "feature_seconds": round(t_feat, 2),
            "fit_seconds": round(result.seconds, 2),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "loss": "mean NLL per feature dim, nats (0.5|z|^2 + 0.5 log 2pi - log|det J| per dim)",
        }
        model_file, _ = out.path(MODEL_FILE)
        save_model(model_file, result.model, fx, params,
                   extra={"best_epoch": result.best_epoch, "n_train_images": card["n_train_images"]})
        card_file, _ = out.path("card.json")
        card_file.write_text(json.dumps(card, indent=2) + "\n")
        loss_file, _ = out.path("train_loss.csv")
        pd.DataFrame(result.history, columns=["epoch", "train_nll", "val_nll"]).to_csv(loss_file, index=False)

        report.read.append(str(src))
        report.wrote += [str(Path(out_dir) / n) for n in (MODEL_FILE, "card.json", "train_loss.csv")]
        report.n_in, report.n_out = len(df), len(train_df)
        report.notes.append(f"trained on {len(train_df)} good images x {tp.n_transforms} rotations "
                            f"({fx.dim}-dim {tp.backbone} features), {len(val_df)} good val images")
        report.notes.append(f"{card['model_selection']}: epoch {result.best_epoch}/{tp.epochs}, "
                            f"train NLL {result.final_train_nll:.4f}, best val NLL {result.best_val_nll}")
    return report
