"""Galleries: worst false alarms and missed defects (labelled images only), composite masks, and for a
retrain the previous model's metrics and verdicts side by side with this one's."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from defectflow.reporting.overlays import thumbnail

COMPARED = ("image_auroc", "pixel_auroc", "accuracy", "precision", "recall", "f1", "fpr", "product_accuracy",
            "n_products_flagged", "threshold")


def _tile(rec: dict) -> dict:
    return {"product_id": str(rec["product_id"]), "camera": str(rec["camera"]), "score": float(rec["score"]),
            "defect_type": rec.get("defect_type") if isinstance(rec.get("defect_type"), str) else "",
            "img": thumbnail(rec["image_path"])}


def false_alarms(scored: pd.DataFrame, n: int) -> list[dict]:
    """Good-labelled images over the threshold, highest score first."""
    rows = scored[(scored["label"] == "good") & scored["pred_defect"].astype(bool)]
    return [_tile(r) for r in rows.sort_values("score", ascending=False).head(n).to_dict("records")]


def missed_defects(scored: pd.DataFrame, n: int) -> list[dict]:
    """Defect-labelled images under the threshold, lowest score first."""
    rows = scored[(scored["label"] == "defect") & ~scored["pred_defect"].astype(bool)]
    return [_tile(r) for r in rows.sort_values("score").head(n).to_dict("records")]


def composite_masks(scored: pd.DataFrame, product_ids: list[str], n: int) -> list[dict]:
    """The masks stage's composite mask of each shown product's cameras (where it made one)."""
    if "composite_mask_path" not in scored.columns:
        return []
    rows = scored[scored["product_id"].astype(str).isin(product_ids) & scored["composite_mask_path"].notna()]
    rows = rows.drop_duplicates(["product_id", "camera"]).head(n)
    out = []
    for r in rows.to_dict("records"):
        img = thumbnail(r["composite_mask_path"])
        if img:
            out.append({"product_id": str(r["product_id"]), "camera": str(r["camera"]), "img": img})
    return out


def previous_run(out_dir: Path) -> dict | None:
    """The last evaluate's metrics, verdicts and model version, read from ``out_dir`` before it is replaced."""
    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    qa = {}
    try:
        qa = json.loads((out_dir / "qa.json").read_text())
    except (OSError, ValueError):
        pass
    verdicts = None
    try:
        verdicts = pd.read_parquet(out_dir / "verdicts.parquet", columns=["product_id", "verdict"])
    except (OSError, ValueError, KeyError):
        pass
    return {"metrics": metrics, "verdicts": verdicts, "model_version": (qa.get("card") or {}).get("model_version")}


def comparison(previous: dict | None, metrics: dict, verdicts: pd.DataFrame, model_version: str | None) -> dict | None:
    """Previous vs this model: metric rows and the products whose verdict changed; None without a
    previous run or when the model is the same."""
    if not previous or (previous.get("model_version") and previous["model_version"] == model_version):
        return None
    pm = previous["metrics"]
    rows = [{"name": k, "before": pm.get(k), "after": metrics.get(k)} for k in COMPARED if k in pm or k in metrics]
    changed = []
    if previous.get("verdicts") is not None:
        before = previous["verdicts"].set_index("product_id")["verdict"]
        for r in verdicts.itertuples():
            if r.product_id in before.index and before[r.product_id] != r.verdict:
                changed.append({"product_id": r.product_id, "before": before[r.product_id], "after": r.verdict,
                                "label": r.label})
    return {"previous_model": previous.get("model_version"), "model": model_version, "rows": rows,
            "changed": changed}
