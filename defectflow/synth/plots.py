"""The KID curve as a PNG (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_kid(history: pd.DataFrame, floor: float | None, path: Path, title: str = "") -> Path:
    """KID of EMA samples vs held-out reals over kimg, with the real-halves floor as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    if "kid" in history:
        ax.plot(history["kimg"], history["kid"], marker="o", label="KID samples vs held-out reals")
    if floor is not None:
        ax.axhline(floor, ls="--", color="grey", label="KID real halves (floor)")
    ax.set_xlabel("kimg"), ax.set_ylabel("KID (backbone features)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
