"""augment: the image transform (changes, determinism, identity when off) and the stage's rows."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from vision_scene import write_images

from defectflow import augment
from defectflow.config import AugmentParams, params_from_dict
from defectflow.manifest import AUGMENT, ROI, read_manifest, read_meta, write_manifest


def picture(seed=0, h=48, w=64):
    """An asymmetric, colourful test picture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (40, 120, 200)
    cv2.rectangle(img, (5, 5), (25, 20), (200, 60, 30), -1)
    cv2.circle(img, (45, 32), 10, (30, 200, 90), -1)
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


def test_augment_image_changes_the_image_deterministically():
    img, p = picture(), AugmentParams()
    a = augment.augment_image(img, np.random.default_rng(7), p)
    b = augment.augment_image(img, np.random.default_rng(7), p)
    c = augment.augment_image(img, np.random.default_rng(8), p)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(int) - img).mean() > 5


def test_augment_image_is_identity_when_everything_is_off():
    p = AugmentParams(flip=False, rotate_deg=0, hue=0, saturation=0, brightness=0, exposure=0)
    img = picture()
    out = augment.augment_image(img, np.random.default_rng(0), p)
    assert np.abs(out.astype(int) - img).max() <= 1


def test_hue_only_keeps_geometry_and_brightness_of_grey():
    p = AugmentParams(flip=False, rotate_deg=0, hue=60, saturation=0, brightness=0, exposure=0)
    img = picture()
    img[:10, :10] = 128                                   # grey has no hue: unchanged
    out = augment.augment_image(img, np.random.default_rng(3), p)
    assert np.abs(out[:10, :10].astype(int) - 128).max() <= 1
    assert np.abs(out.astype(int) - img).max() > 20       # coloured areas changed hue


def test_rotation_border_reflects_or_stays_black():
    p = AugmentParams(flip=False, rotate_deg=45, hue=0, saturation=0, brightness=0, exposure=0)
    img = np.full((40, 40, 3), 200, np.uint8)
    seed = 0                              # draws a rotation of about -41 degrees
    black = augment.augment_image(img, np.random.default_rng(seed), p, cv2.BORDER_CONSTANT)
    reflected = augment.augment_image(img, np.random.default_rng(seed), p)
    assert black[0, 0].max() == 0 and black[20, 20].min() >= 199
    assert reflected[0, 0].min() >= 199
    assert augment.is_masked({"composite_mask_path": "c.png", "roi_found": None})
    assert augment.is_masked({"composite_mask_path": None, "roi_found": True})
    assert not augment.is_masked({"composite_mask_path": None, "roi_found": None})


def _stage_input(root):
    imgs = [picture(k) for k in range(5)]
    return write_images(root, imgs, ROI,
                        split=["train", "train", "train", "train", "test"],
                        label=["good", "good", "defect", "good", "good"],
                        is_center=[True, False, True, True, True])


def test_stage_adds_copies_of_good_training_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _stage_input(Path("roi"))
    params = params_from_dict({"seed": 3, "augment": {"copies": 2}})
    report = augment.run(params, Path("roi"), Path("out/aug"))
    df = read_manifest("out/aug/manifest.parquet", AUGMENT)

    good = ["im00", "im01", "im03"]
    assert len(df) == 5 + 2 * 3 and report.n_out == len(df)
    assert set(src.item_id) <= set(df.item_id)
    copies = df[df.augment_of.notna()]
    assert sorted(copies.item_id) == sorted(f"{g}_aug{k}" for g in good for k in range(2))
    for row in copies.itertuples():
        orig = src.set_index("item_id").loc[row.augment_of]
        assert row.is_center == orig.is_center and row.split == "train" and row.label == "good"
        assert row.product_id == orig.product_id
        a, o = cv2.imread(row.image_path), cv2.imread(orig.image_path)
        assert a.shape == o.shape and not np.array_equal(a, o)
    originals = df[df.augment_of.isna()].set_index("item_id")
    assert (originals.loc[src.item_id, "image_path"].to_numpy() == src.image_path.to_numpy()).all()
    assert read_meta("out/aug/manifest.parquet")["copies"] == "2"


def test_stage_output_does_not_depend_on_row_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _stage_input(Path("roi"))
    params = params_from_dict({"seed": 3})
    augment.run(params, Path("roi"), Path("out/a"))
    shuffled = src.sample(frac=1.0, random_state=1)
    Path("roi2").mkdir()
    write_manifest(shuffled, ROI, Path("roi2/manifest.parquet"))
    augment.run(params, Path("roi2"), Path("out/b"))
    augment.run(params_from_dict({"seed": 4}), Path("roi"), Path("out/c"))
    a = read_manifest("out/a/manifest.parquet", AUGMENT).set_index("item_id")
    b = read_manifest("out/b/manifest.parquet", AUGMENT).set_index("item_id")
    c = read_manifest("out/c/manifest.parquet", AUGMENT).set_index("item_id")
    for item in a.index[a.augment_of.notna()]:
        img_a = cv2.imread(a.loc[item, "image_path"])
        assert np.array_equal(img_a, cv2.imread(b.loc[item, "image_path"]))
        assert not np.array_equal(img_a, cv2.imread(c.loc[item, "image_path"]))


@pytest.mark.parametrize("setting,reason", [({"enabled": False}, "augment.enabled=false"),
                                            ({"copies": 0}, "augment.copies=0")])
def test_switched_off_forwards_rows(tmp_path, monkeypatch, setting, reason):
    monkeypatch.chdir(tmp_path)
    src = _stage_input(Path("roi"))
    augment.run(params_from_dict({"augment": setting}), Path("roi"), Path("out/aug"))
    df = read_manifest("out/aug/manifest.parquet", AUGMENT)
    pd.testing.assert_series_equal(df.item_id, src.item_id, check_dtype=False)
    assert df.augment_of.isna().all()
    assert read_meta("out/aug/manifest.parquet")["skipped"] == reason

