"""Maximum-likelihood training of a :class:`DensityModel` on feature vectors (CPU, seeded).

Loss = mean over the batch of NLL per dimension (all terms, see ``model.py``).
Model selection, when validation features are given, is by the validation NLL of
*good validation images only* (the caller's duty): the epoch with the lowest one is kept, and
training stops ``patience`` epochs after the last improvement (the flow overfits fast on a
few hundred images: validation NLL rises by orders of magnitude after its minimum).

``features_per_scale`` (DifferSqueezeNet's lesson: fewer features, a smaller head) first
projects each scale's block of ``in_dim / n_scales`` features onto its top principal
components on the training vectors (float64 SVD: deterministic); the projection is a fixed
part of the model.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from defectflow.density.model import DensityModel
from defectflow.errors import DefectflowError
from defectflow.stage import logger

log = logger("density")


class DensityFitError(DefectflowError):
    """Training could not run or diverged."""


@dataclass(frozen=True)
class FitConfig:
    n_blocks: int = 8
    hidden: int = 512
    clamp: float = 2.0
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-5
    seed: int = 0
    grad_clip: float = 10.0
    features_per_scale: Optional[int] = None   # PCA components kept per scale block; None = all
    n_scales: int = 1
    patience: Optional[int] = None             # stop after this many epochs without a better val NLL


@dataclass
class FitResult:
    model: DensityModel
    history: list[dict] = field(default_factory=list)   # {epoch, train_nll, val_nll}
    best_epoch: int = 0
    seconds: float = 0.0

    @property
    def final_train_nll(self) -> float:
        return self.history[-1]["train_nll"]

    @property
    def best_val_nll(self) -> Optional[float]:
        vals = [h["val_nll"] for h in self.history if h["val_nll"] is not None]
        return min(vals) if vals else None


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of training features ``(M, D)``; near-constant dims get a floor
    (1 % of the mean std) so that a feature the training set never varies cannot blow up."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    floor = 0.01 * float(std.mean()) + 1e-8
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def pca_projection(x: np.ndarray, n_scales: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-diagonal PCA: ``(mean (D,), W (D, n_scales * k))``; each scale's columns onto its top ``k``."""
    m, d = x.shape
    if d % n_scales:
        raise DensityFitError(f"feature dim {d} is not a multiple of the {n_scales} scales")
    block = d // n_scales
    k = min(k, block)
    mean = x.mean(axis=0, dtype=np.float64)
    w = np.zeros((d, n_scales * k), np.float64)
    for s in range(n_scales):
        xs = x[:, s * block:(s + 1) * block].astype(np.float64) - mean[s * block:(s + 1) * block]
        _, _, vt = np.linalg.svd(xs, full_matrices=False)
        comp = vt[:k]
        # fix SVD's sign freedom: the largest entry of each component is positive
        signs = np.sign(comp[np.arange(len(comp)), np.abs(comp).argmax(axis=1)])
        comp = comp * np.where(signs == 0, 1.0, signs)[:, None]
        if comp.shape[0] < k:
            raise DensityFitError(f"features_per_scale {k} needs at least {k} training vectors, got {m}")
        w[s * block:(s + 1) * block, s * k:(s + 1) * k] = comp.T
    return mean.astype(np.float32), w.astype(np.float32)


def fit_density(train_x: np.ndarray, val_x: Optional[np.ndarray] = None, cfg: FitConfig = FitConfig(),
                progress: bool = False) -> FitResult:
    """Train on ``train_x`` ``(M, D)``; ``val_x`` ``(N, T, D)`` (good validation images) picks the epoch."""
    train_x = np.asarray(train_x, np.float32)
    if train_x.ndim != 2 or len(train_x) < 2:
        raise DensityFitError(f"need at least 2 training feature vectors of shape (M, D), got {train_x.shape}")
    if not np.isfinite(train_x).all():
        raise DensityFitError("training features contain NaN or inf")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    in_dim, proj_kw = train_x.shape[1], {}
    if cfg.features_per_scale and cfg.features_per_scale * cfg.n_scales < in_dim:
        pm, pw = pca_projection(train_x, cfg.n_scales, cfg.features_per_scale)
        train_x = ((train_x - pm) @ pw).astype(np.float32)
        proj_kw = {"in_dim": in_dim, "proj_mean": torch.from_numpy(pm), "proj": torch.from_numpy(pw)}
    mean, std = feature_stats(train_x)
    model = DensityModel(train_x.shape[1], cfg.n_blocks, cfg.hidden, cfg.clamp, seed=cfg.seed,
                         mean=torch.from_numpy(mean), std=torch.from_numpy(std), **proj_kw)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = torch.from_numpy(train_x)
    xv = torch.from_numpy(np.asarray(val_x, np.float32)) if val_x is not None and len(val_x) else None
    result = FitResult(model)
    best_state, best_val = None, math.inf
    epochs = range(1, cfg.epochs + 1)
    if progress:
        from tqdm import tqdm
        epochs = tqdm(epochs, desc="train", unit="epoch", leave=False)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            batch = x[order[i:i + cfg.batch_size]]
            loss = model.nll_per_dim(batch).mean()
            if not torch.isfinite(loss):
                raise DensityFitError(f"training diverged at epoch {epoch} (loss {loss.item()}); "
                                      "lower train.lr or train.clamp")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.item() * len(batch)
            count += len(batch)
        model.eval()
        val_nll = None
        if xv is not None:
            val_nll = float(model.score(xv).mean())
            if val_nll < best_val:
                best_val, best_state, result.best_epoch = val_nll, copy.deepcopy(model.state_dict()), epoch
        result.history.append({"epoch": epoch, "train_nll": total / count, "val_nll": val_nll})
        if cfg.patience and xv is not None and epoch - result.best_epoch >= cfg.patience:
            log.info("stopping at epoch %d: no better validation NLL for %d epochs", epoch, cfg.patience)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
