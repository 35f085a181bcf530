"""Image AUROC of other ways to fuse the two heads' scores, offline, on suite work folders.

    python bench/fusion_rules.py /tmp/suite-work/bottle /tmp/suite-work/screw ...   # bench/suite.py --work DIR

Reads each folder's ``reports/scores.parquet`` (the test rows, every head's score) and
``model/fusion.json`` (each head's mean / std on good validation images), and prints one JSON line per
folder: the image and conv heads alone, ``mean`` (the default fused score), ``max`` of the standardised
scores, ``lse`` (log-sum-exp), weighted means, and ``rss`` (root of the summed squared positive z).
Choose a rule by the whole suite, never by one dataset.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def rules(work: Path) -> dict:
    sc = pd.read_parquet(work / "reports" / "scores.parquet")
    sc = sc[(sc.split == "test") & sc.label.isin(["good", "defect"])]
    stats = json.loads((work / "model" / "fusion.json").read_text())["heads"]
    z = {h: (sc[f"score_{h}"].to_numpy() - v["mean"]) / v["std"] for h, v in stats.items()}
    y = (sc.label == "defect").to_numpy()
    auc = lambda s: round(float(roc_auc_score(y, s)), 4)  # noqa: E731
    out = {"work": work.name, "image": auc(z["image"]), "conv": auc(z["conv"]),
           "mean": auc((z["image"] + z["conv"]) / 2), "max": auc(np.maximum(z["image"], z["conv"])),
           "lse": auc(np.logaddexp(z["image"], z["conv"])),
           "rss": auc(np.hypot(np.clip(z["image"], 0, None), np.clip(z["conv"], 0, None)))}
    for w in (0.1, 0.2, 0.3, 0.5, 0.7):
        out[f"image_weight_{w}"] = auc(w * z["image"] + (1 - w) * z["conv"])
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for folder in sys.argv[1:]:
        print(json.dumps(rules(Path(folder))), flush=True)
