"""Train a generator under a budget (minutes and/or kimg), with KID / FID logged along the way.

:func:`fit` evaluates the EMA generator before training (the untrained figure) and every
``eval_every`` of the budget, saves a checkpoint at each evaluation and at the end (resume with
``resume=True``; warm start from another run's checkpoint with ``warm_start``), and returns the
:class:`FitResult` with the KID curve.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from defectflow.fsutil import read_image
from defectflow.synth.networks import NetConfig
from defectflow.synth.quality import FeatureModel, fid, kid, real_halves_kid
from defectflow.synth.trainer import CheckpointError, TrainConfig, Trainer, kimg

log = logging.getLogger("defectflow.synth")
EVAL_SAMPLES = 256
EVAL_SEED = 12345
MAX_FEATURE_IMAGES = 256   # real images per set whose features KID uses (a seeded subset beyond that)


@dataclass
class FitResult:
    trainer: Trainer
    history: list[dict] = field(default_factory=list)   # kimg, seconds, kid, fid, p
    train_s: float = 0.0          # seconds in training steps (the budget counts these; evaluations excluded)
    wall_s: float = 0.0           # training and evaluations
    kid_real_halves: float | None = None
    warm_started_from: str | None = None
    resumed: bool = False

    @property
    def kid_untrained(self) -> float | None:
        return self.history[0].get("kid") if self.history else None

    @property
    def kid_trained(self) -> float | None:
        return self.history[-1].get("kid") if self.history else None


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Image files as ``(N, 3, size, size)`` RGB in [-1, 1] (area-resized, square)."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc="synth: read images", leave=False, disable=len(paths) < 50)):
        img = read_image(p)
        out[i] = cv2.cvtColor(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("synth.device=cuda but no CUDA device is available")
    return device


def fit(reals: torch.Tensor, heldout: torch.Tensor | None, net: NetConfig, cfg: TrainConfig, *,
        minutes: float | None, max_kimg: float | None, checkpoint: Path, seed: int = 0, device: str = "cpu",
        resume: bool = False, warm_start: Path | None = None, evals: int = 5,
        features: FeatureModel | None = None, threads: int = 1,
        eval_samples: int = EVAL_SAMPLES) -> FitResult:
    """Train on ``reals`` until ``minutes`` of training-step time or ``max_kimg`` thousand images (the first reached).

    With ``heldout`` reals (and ``features``), KID/FID of EMA samples against them are measured at
    the start and ``evals`` times over the budget; the floor ``kid_real_halves`` is measured on all reals.
    """
    if minutes is None and max_kimg is None:
        raise ValueError("fit needs a budget: minutes and/or max_kimg")
    torch.set_num_threads(threads)
    trainer = Trainer(net, cfg, reals, seed=seed, device=device)
    result = FitResult(trainer)
    if resume and checkpoint.is_file():
        extra = trainer.load(checkpoint)
        result.history, result.resumed = list(extra.get("history", [])), True
        log.info("synth: resumed %s at %.2f kimg", checkpoint, trainer.nimg / 1000)
    elif warm_start is not None and warm_start.is_file():
        try:
            trainer.load(warm_start, weights_only=True)
            result.warm_started_from = str(warm_start)
            log.info("synth: warm start from %s (p=%.3f)", warm_start, trainer.ada.p)
        except CheckpointError as err:
            log.warning("synth: no warm start (%s); training from scratch", err)

    real_feats = None
    if heldout is not None and features is not None and len(heldout) >= 2:
        pick = np.random.default_rng(seed)
        cap = lambda x: x[np.sort(pick.permutation(len(x))[:MAX_FEATURE_IMAGES])] if len(x) > MAX_FEATURE_IMAGES else x  # noqa: E731
        raw_held = features(cap(heldout))
        raw_all = np.concatenate([features(cap(reals)), raw_held])
        # one global scale so that x.x / d is about 1 for the reals (as for Inception features): the
        # cubic KID kernel is not scale-invariant, and raw pooled maps made it explode
        scale = np.sqrt(np.square(raw_all).sum(1).mean() / raw_all.shape[1])
        scaled = lambda f: f / scale  # noqa: E731
        real_feats = scaled(raw_held)
        result.kid_real_halves = real_halves_kid(scaled(raw_all), seed)

    def evaluate(seconds: float) -> None:
        row = {"kimg": kimg(trainer.nimg), "seconds": round(seconds, 1), "p": round(trainer.ada.p, 4)}
        if real_feats is not None:
            fake_feats = scaled(features(trainer.sample(eval_samples, seed=EVAL_SEED)))
            row.update(kid=kid(fake_feats, real_feats), fid=fid(fake_feats, real_feats))
            log.info("synth: %.2f kimg, %.0f s: KID %.4f FID %.2f p %.3f", row["kimg"], seconds, row["kid"],
                     row["fid"], row["p"])
        result.history.append(row)

    if not result.history:
        evaluate(0.0)
    budget_s = minutes * 60 if minutes is not None else float("inf")
    budget_n = max_kimg * 1000 if max_kimg is not None else float("inf")
    start_n = trainer.nimg if result.resumed else 0
    marks_s = [budget_s * (k + 1) / evals for k in range(evals)]
    marks_n = [start_n + (budget_n - start_n) * (k + 1) / evals for k in range(evals)]
    train_s, next_eval, t_wall = 0.0, 0, time.perf_counter()
    bar = tqdm(desc="synth: train", unit="step", leave=False, mininterval=5)
    while train_s < budget_s and trainer.nimg < budget_n:
        t0 = time.perf_counter()
        trainer.train_step()
        train_s += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(kimg=f"{trainer.nimg / 1000:.2f}", p=f"{trainer.ada.p:.3f}", refresh=False)
        if next_eval < evals - 1 and (train_s >= marks_s[next_eval] or trainer.nimg >= marks_n[next_eval]):
            evaluate(train_s)
            trainer.save(checkpoint, {"history": result.history})
            next_eval += 1
    bar.close()
    result.train_s = train_s
    if not result.history or result.history[-1]["kimg"] != kimg(trainer.nimg):
        evaluate(train_s)
    result.wall_s = time.perf_counter() - t_wall
    trainer.save(checkpoint, {"history": result.history})
    return result
