"""The ``images`` source: an MVTec-AD-layout folder (train/good, test/<type>, ground_truth/<type>).

Every image is one product seen by one camera (``cam0``). A seeded share
(``source.val_fraction``) of train/good is held out as the validation split;
test/<type> is the test split, labelled ``good`` or ``defect`` (defect_type = <type>).
"""
from __future__ import annotations

from defectflow.errors import DefectflowError

from pathlib import Path

import numpy as np
import pandas as pd

from defectflow.config import Params

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class SourceError(DefectflowError):
    """A source folder does not have the expected layout."""


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _gt_mask(root: Path, defect_type: str, image: Path) -> str | None:
    folder = root / "ground_truth" / defect_type
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (folder / name).is_file():
            return (folder / name).as_posix()
    return None


def load_items(params: Params) -> pd.DataFrame:
    """Index an MVTec-layout folder into ITEMS rows (train / val / test).

    A folder without ``train/`` (new images to score) gives every image, searched
    recursively, as a ``test`` row labelled ``unknown``.
    """
    root = Path(params.source.path)
    train_dir = root / "train" / "good"
    if not root.is_dir():
        raise SourceError(f"{root}: images source folder not found")
    if not (root / "train").exists():
        return load_unlabelled(root)
    if not train_dir.is_dir():
        raise SourceError(f"{root}: expected MVTec layout, missing folder {train_dir}")
    train = _images(train_dir)
    if not train:
        raise SourceError(f"{train_dir}: no good training images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rng = np.random.default_rng(params.seed)
    n_val = max(1, int(round(len(train) * params.source.val_fraction)))
    if n_val >= len(train):
        raise SourceError(f"{train_dir}: {len(train)} good image(s) cannot be split into train and validation")
    val_idx = set(rng.choice(len(train), size=n_val, replace=False).tolist())
    rows = []
    for i, path in enumerate(train):
        split = "val" if i in val_idx else "train"
        rows.append(_row(root, path, split, "good", None))
    test_root = root / "test"
    if test_root.is_dir():
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            label = "good" if type_dir.name == "good" else "defect"
            for path in _images(type_dir):
                defect_type = None if label == "good" else type_dir.name
                mask = _gt_mask(root, type_dir.name, path) if label == "defect" else None
                rows.append(_row(root, path, "test", label, defect_type, mask))
    return pd.DataFrame(rows)


def load_unlabelled(root: Path) -> pd.DataFrame:
    """Every image under ``root`` as a test row with label ``unknown`` (for scoring)."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SourceError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = []
    for path in paths:
        row = _row(root, path, "test", "unknown", None)
        row["item_id"] = row["product_id"] = path.relative_to(root).with_suffix("").as_posix()
        rows.append(row)
    return pd.DataFrame(rows)


def _row(root: Path, path: Path, split: str, label: str, defect_type: str | None,
         gt_mask: str | None = None) -> dict:
    group = path.parent.name
    product = f"{split}/{group}/{path.stem}"
    return {
        "item_id": product,
        "product_id": product,
        "run": root.name,
        "camera": "cam0",
        "split": split,
        "label": label,
        "defect_type": defect_type,
        "image_path": path.as_posix(),
        "gt_mask_path": gt_mask,
        "source": "images",
    }
