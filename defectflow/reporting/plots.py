"""Report figures as PNG bytes (matplotlib, Agg) and the tables DVC plots: ROC, precision-recall,
confusion, score histogram, defect-rate trend, family scatter."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

LABEL_COLOURS = {"good": "#1b7f3b", "defect": "#b00020", "unknown": "#888"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def labelled(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
    """(is defect, score) of the images labelled good or defect; None unless both classes are there."""
    s = np.asarray(scores, np.float64)
    lab = np.asarray(labels, dtype=object)
    known = np.isin(lab, ["good", "defect"])
    y = lab[known] == "defect"
    return (y, s[known]) if 0 < y.sum() < len(y) else None


def pr_table(scores, labels) -> pd.DataFrame:
    """``recall,precision,threshold`` over the labelled images (empty with one class)."""
    from sklearn.metrics import precision_recall_curve

    both = labelled(scores, labels)
    if both is None:
        return pd.DataFrame(columns=["recall", "precision", "threshold"])
    p, r, t = precision_recall_curve(*both)
    return pd.DataFrame({"recall": r[:-1], "precision": p[:-1], "threshold": t})


def confusion_table(labels, predicted_defect) -> pd.DataFrame:
    """One row per labelled image: ``actual,predicted`` (good / defect), the form DVC's confusion template reads."""
    lab = np.asarray(labels, dtype=object)
    pred = np.asarray(predicted_defect, bool)
    known = np.isin(lab, ["good", "defect"])
    return pd.DataFrame({"actual": lab[known].astype(str), "predicted": np.where(pred[known], "defect", "good")})


def roc_plot(roc: pd.DataFrame, auroc: float | None, op_point: tuple[float, float] | None) -> bytes | None:
    """ROC curve PNG (None when there is no curve: a single class)."""
    if roc.empty:
        return None
    fig, ax = _plt().subplots(figsize=(5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUROC {auroc:.4f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], ls="--", c="#999", lw=1)
    if op_point is not None:
        ax.plot([op_point[0]], [op_point[1]], "o", c="#b00020", label="threshold")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test images)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _png(fig)


def pr_plot(pr: pd.DataFrame, op_point: tuple[float, float] | None) -> bytes | None:
    """Precision-recall PNG; ``op_point`` = (recall, precision) at the threshold."""
    if pr.empty:
        return None
    fig, ax = _plt().subplots(figsize=(5, 4.5))
    ax.plot(pr["recall"], pr["precision"], lw=2)
    if op_point is not None and None not in op_point:
        ax.plot([op_point[0]], [op_point[1]], "o", c="#b00020", label="threshold")
        ax.legend(loc="lower left")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test images)", xlim=(0, 1), ylim=(0, 1.02))
    return _png(fig)


def hist_plot(hist: pd.DataFrame, threshold: float, clipped: bool = False) -> bytes | None:
    if hist.empty:
        return None
    fig, ax = _plt().subplots(figsize=(5.5, 4.5))
    width = float(np.diff(hist["score"]).min()) if len(hist) > 1 else 1.0
    for label, c in LABEL_COLOURS.items():
        if label in hist and hist[label].sum():
            ax.bar(hist["score"], hist[label], width=width, alpha=0.55, color=c, label=label)
    ax.axvline(threshold, c="k", ls="--", lw=1, label="threshold")
    ax.set(xlabel="anomaly score" + ("; last bar: all higher scores" if clipped else ""),
           ylabel="images", title="Score histogram")
    ax.legend()
    return _png(fig)


def trend_plot(history: list[dict]) -> bytes | None:
    """Defect rate (flagged / inspected) of every recorded run, evaluate and score runs marked apart."""
    rows = [h for h in history if h.get("defect_rate") is not None]
    if not rows:
        return None
    fig, ax = _plt().subplots(figsize=(7, 2.6))
    x = np.arange(len(rows))
    rate = np.array([100 * h["defect_rate"] for h in rows])
    ax.plot(x, rate, c="#555", lw=1)
    for kind, marker in (("evaluate", "o"), ("score", "s")):
        sel = np.array([h.get("kind") == kind for h in rows])
        if sel.any():
            ax.plot(x[sel], rate[sel], marker, label=kind)
    ax.plot([x[-1]], [rate[-1]], "o", ms=11, mfc="none", c="#b00020", label="this run")
    step = max(1, len(rows) // 8)
    ax.set_xticks(x[::step], [h["time"][5:16].replace("T", " ") for h in rows][::step], fontsize=7)
    ax.set(ylabel="flagged %", title="Defect rate per run")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def scatter_plot(xy: np.ndarray, clusters: np.ndarray, title: str) -> bytes | None:
    """2-D embedding coloured by cluster."""
    if len(xy) == 0:
        return None
    fig, ax = _plt().subplots(figsize=(5, 4.2))
    for k in np.unique(clusters):
        sel = clusters == k
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, label=f"family {k + 1}")
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=7)
    return _png(fig)
