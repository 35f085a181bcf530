import cv2
import numpy as np
import pytest

from defectflow.config import params_from_dict
from defectflow.sources.images import SourceError, load_items


def make_mvtec(root, n_train=10, n_good=3, n_bad=2):
    rng = np.random.default_rng(0)
    for folder, n in (("train/good", n_train), ("test/good", n_good), ("test/scratch", n_bad)):
        (root / folder).mkdir(parents=True)
        for k in range(n):
            cv2.imwrite(str(root / folder / f"{k:03d}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (root / "ground_truth/scratch").mkdir(parents=True)
    for k in range(n_bad):
        cv2.imwrite(str(root / f"ground_truth/scratch/{k:03d}_mask.png"), np.zeros((16, 16), np.uint8))
    return root


def test_mvtec_layout_is_split_and_labelled(tmp_path):
    root = make_mvtec(tmp_path / "bottle")
    p = params_from_dict({"source": {"kind": "images", "path": str(root), "val_fraction": 0.2}})
    df = load_items(p)
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "good"): 8, ("val", "good"): 2, ("test", "good"): 3, ("test", "defect"): 2}
    bad = df[df.label == "defect"]
    assert (bad.defect_type == "scratch").all() and bad.gt_mask_path.notna().all()
    assert df.item_id.is_unique
    assert load_items(p).equals(df)  # seeded split


def test_missing_layout_is_named(tmp_path):
    p = params_from_dict({"source": {"kind": "images", "path": str(tmp_path)}})
    with pytest.raises(SourceError, match="no images found"):
        load_items(p)
    (tmp_path / "train").mkdir()
    with pytest.raises(SourceError, match="train/good"):
        load_items(p)
    (tmp_path / "train/good").mkdir()
    with pytest.raises(SourceError, match="no good training images"):
        load_items(p)


def test_plain_folder_is_scored_as_unknown(tmp_path):
    root = make_mvtec(tmp_path / "bottle")
    p = params_from_dict({"source": {"kind": "images", "path": str(root / "test")}})
    df = load_items(p)
    assert len(df) == 5 and (df.label == "unknown").all() and (df.split == "test").all()
    assert set(df.item_id) == {"good/000", "good/001", "good/002", "scratch/000", "scratch/001"}


def test_images_are_streamed_in_row_chunks_that_cover_the_source_once(tmp_path):
    import pandas as pd

    from defectflow import frames
    from defectflow.units.chunks import image_chunks

    root = make_mvtec(tmp_path / "bottle", n_good=4, n_bad=3)
    p = params_from_dict({"source": {"kind": "images", "path": str(root / "test")}})
    chunks = image_chunks(len(load_items(p)), 3)
    assert chunks == [(0, 3), (3, 6), (6, 7)]
    parts = []
    for k, rows in enumerate(chunks):
        frames.run(p, root / "test", tmp_path / f"chunk{k}", rows=rows)
        parts.append(pd.read_parquet(tmp_path / f"chunk{k}/manifest.parquet"))
    frames.run(p, root / "test", tmp_path / "all")
    whole = pd.read_parquet(tmp_path / "all/manifest.parquet")
    assert [len(x) for x in parts] == [3, 3, 1] and whole["is_center"].all()
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
    with pytest.raises(ValueError, match="per_chunk"):
        image_chunks(5, 0)
