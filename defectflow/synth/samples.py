"""Synthetic normals as files and manifest rows: one image per seed, reproducible from (checkpoint, seed, psi)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from defectflow.fsutil import write_image
from defectflow.synth.networks import Generator

SEED_STRIDE = 1_000_003   # image k of a run seeded s has synth_seed s * SEED_STRIDE + k


def image_seeds(seed: int, n: int) -> list[int]:
    return [seed * SEED_STRIDE + k for k in range(n)]


@torch.no_grad()
def generate(g: Generator, seed: int, psi: float) -> np.ndarray:
    """One uint8 RGB image ``(S, S, 3)`` of generator ``g`` from ``seed`` (z and noise) at truncation ``psi``."""
    device = next(g.parameters()).device
    rng = torch.Generator(device=device).manual_seed(int(seed))
    z = torch.randn(1, g.cfg.z_dim, generator=rng, device=device)
    img = g(z, psi=psi, noise_generator=rng)[0].clamp(-1, 1)
    return ((img + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_samples(g: Generator, seeds: list[int], psi: float, folder: Path) -> list[Path]:
    """Write ``folder/synth_<seed>.png`` per seed; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in tqdm(seeds, desc="synth: samples", leave=False, disable=len(seeds) < 50):
        path = folder / f"synth_{s}.png"
        write_image(path, cv2.cvtColor(generate(g, s, psi), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def synthetic_rows(template: pd.Series, recorded_paths: list[str], seeds: list[int], psi: float) -> pd.DataFrame:
    """SYNTH rows for synthetic train goods, modelled on ``template`` (a real train good row)."""
    rows = []
    for path, s in zip(recorded_paths, seeds):
        row = {c: None for c in template.index}
        row.update(item_id=f"synth-{s}", product_id=f"synth-{s}", run=template["run"], camera=template["camera"],
                   split="train", label="good", image_path=str(path), source=template["source"],
                   is_center=False, synthetic=True, synth_seed=int(s), synth_psi=float(psi))
        rows.append(row)
    return pd.DataFrame(rows)
