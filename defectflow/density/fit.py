"""Maximum-likelihood training of a :class:`DensityModel` on feature vectors (CPU, seeded).

Loss = mean over the batch of NLL per dimension (all terms, see ``model.py``).
Model selection, when validation features are given, is by the validation NLL of
*good validation images only* (the caller's duty): the epoch with the lowest one is kept.
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
    mean, std = feature_stats(train_x)
    model = DensityModel(train_x.shape[1], cfg.n_blocks, cfg.hidden, cfg.clamp, seed=cfg.seed,
                         mean=torch.from_numpy(mean), std=torch.from_numpy(std))
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
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = cfg.epochs
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
