"""masks: soft masks, the composite against the drawn silhouette, the shrink, masked crops, skips."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from vision_scene import iou, make_scene, write_images

from defectflow import detect, masks
from defectflow.config import params_from_dict
from defectflow.imgops import crop_square, shrink_and_pad, square_box
from defectflow.manifest import DETECT, MASKS, read_manifest, read_meta

CROP = 96


def _params(**mask_params):
    return params_from_dict({"detect": {"crop_size": CROP}, "masks": mask_params})


@pytest.fixture
def detected(tmp_path, monkeypatch):
    """A two-product scene run through detect; returns (scene, detect folder)."""
    monkeypatch.chdir(tmp_path)
    scene = make_scene(Path("data"), n_passes=2)
    detect.run(_params(), scene.inp, Path("out/detect"))
    return scene, Path("out/detect")


def _truth_in_crop(scene, row, margin=0.1):
    box = (row.box_x0, row.box_y0, row.box_x1, row.box_y1)
    return crop_square(scene.silhouettes[row.item_id], square_box(box, margin), CROP) > 127


def _width(mask):
    cols = np.nonzero(mask.any(axis=0))[0]
    return cols.max() - cols.min() + 1


def _mask(path):
    return cv2.imread(path, cv2.IMREAD_GRAYSCALE) > 0


def test_composite_matches_the_product_and_masks_the_background(detected):
    scene, det = detected
    report = masks.run(_params(shrink=0.0), det, Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    assert len(df) == len(read_manifest(det / "manifest.parquet", DETECT))
    assert df.groupby("product_id").composite_mask_path.nunique().eq(1).all()
    assert df.composite_mask_path.nunique() == 2 and any("2 composite mask(s)" in n for n in report.notes)
    for row in df.itertuples():
        truth = _truth_in_crop(scene, row)
        comp = _mask(row.composite_mask_path)
        assert iou(comp, truth) > 0.85
        fg = cv2.imread(row.fg_mask_path, cv2.IMREAD_GRAYSCALE)
        assert fg[truth].mean() > 200 and fg[~truth].mean() < 40
        crop = cv2.imread(f"out/detect/crops/{row.item_id}.png")
        masked = cv2.imread(row.image_path)
        assert row.image_path.startswith("out/masks/masked/")
        assert (masked[~comp] == 0).all() and (masked[comp] == crop[comp]).all()


def test_shrink_scales_the_composite_about_the_centre(detected):
    _, det = detected
    masks.run(_params(shrink=0.0), det, Path("out/full"))
    masks.run(_params(shrink=0.2), det, Path("out/shrunk"))
    full = read_manifest("out/full/manifest.parquet", MASKS)
    shrunk = read_manifest("out/shrunk/manifest.parquet", MASKS)
    for a_path, b_path in zip(full.composite_mask_path.unique(), shrunk.composite_mask_path.unique()):
        a, b = _mask(a_path), _mask(b_path)
        assert b.shape == a.shape == (CROP, CROP)
        assert b.sum() / a.sum() == pytest.approx(0.8 ** 2, abs=0.04)
        assert _width(b) / _width(a) == pytest.approx(0.8, abs=0.03)
        assert (b & a).sum() / b.sum() > 0.98                     # shrunk towards the centre, inside
        ys, xs = np.nonzero(b)
        assert abs(xs.mean() - (CROP - 1) / 2) < 3 and abs(ys.mean() - (CROP - 1) / 2) < 3


def test_shrink_and_pad_keeps_the_size():
    mask = np.full((50, 50), 255, np.uint8)
    out = shrink_and_pad(mask, 0.2)
    assert out.shape == (50, 50) and (out > 0).sum() == 40 * 40
    assert not out[:5].any() and not out[:, -5:].any()


def test_method_none_forwards_rows(detected):
    _, det = detected
    masks.run(params_from_dict({"masks": {"method": "none"}}), det, Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    src = read_manifest(det / "manifest.parquet", DETECT)
    assert list(df.image_path) == list(src.image_path) and df.composite_mask_path.isna().all()
    assert read_meta("out/masks/manifest.parquet")["skipped"].startswith("masks.method=none")


def test_method_crop_cuts_each_side_and_keeps_the_size(detected):
    _, det = detected
    report = masks.run(_params(method="crop", shrink=0.1), det, Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    src = read_manifest(det / "manifest.parquet", DETECT)
    assert len(df) == len(src) and df.composite_mask_path.isna().all()
    assert read_meta("out/masks/manifest.parquet")["method"] == "crop"
    assert any("cropped by 10% on each side" in n for n in report.notes)
    for new, old in zip(df.image_path, src.image_path):
        assert new.startswith("out/masks/cropped/")
        a, b = cv2.imread(new), cv2.imread(old)
        assert a.shape == b.shape
        centre = cv2.resize(b[10:86, 10:86], (CROP, CROP), interpolation=cv2.INTER_LINEAR)
        assert np.abs(a.astype(int) - centre).max() <= 1


def test_crop_on_images_source_and_crop_border():
    img = np.zeros((100, 100), np.uint8)
    img[10:90, 10:90] = 255                      # a white square with a 10% black border
    out = masks.crop_border(img, 0.1)
    assert out.shape == (100, 100) and out.min() == 255
    assert params_from_dict({"masks": {"method": "crop", "shrink": 0.3}}).masks.shrink == 0.3
    with pytest.raises(Exception, match="shrink"):
        params_from_dict({"masks": {"method": "crop", "shrink": 0.5}})


def test_guided_filter_snaps_a_blurred_mask_to_the_guide_edge():
    guide = np.full((64, 64, 3), (60, 120, 60), np.uint8)
    guide[:, 32:] = (60, 60, 150)                # colour edge of nearly equal brightness
    truth = np.zeros((64, 64), bool)
    truth[:, 32:] = True
    bleed = np.zeros((64, 64), np.float32)
    bleed[:, 30:] = 1                            # a soft mask that bleeds 2 px over the edge, blurred
    soft = cv2.GaussianBlur(bleed, (0, 0), 2)
    assert ((soft >= 0.5) != truth).sum() == 2 * 64
    for sub in (1, 2):
        out = masks.guided_filter(guide, soft, radius=6, eps=1e-4, sub=sub)
        assert ((out >= 0.5) == truth).all()
        assert (out[:, 32] - out[:, 31]).min() > 0.4            # a sharp step at the guide's edge
    flat = masks.guided_filter(np.full((32, 32), 128, np.uint8), soft[:32, 16:48], radius=3, eps=1e-3)
    box = lambda x: cv2.blur(x, (7, 7), borderType=cv2.BORDER_REFLECT)  # noqa: E731
    assert np.allclose(flat, box(box(soft[:32, 16:48])), atol=1e-3)   # flat guide: just a smoothing


def test_raw_composite_is_kept_before_the_shrink(detected):
    _, det = detected
    masks.run(_params(shrink=0.2), det, Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    for path in df.composite_mask_path.unique():
        raw = _mask(path.replace("/composite/", "/composite_raw/"))
        assert (_mask(path) == (shrink_and_pad(raw.astype(np.uint8) * 255, 0.2) > 0)).all()


def test_images_source_forwards_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_images(Path("detect"), [np.zeros((20, 20, 3), np.uint8)] * 2, DETECT)
    masks.run(_params(), Path("detect"), Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    assert list(df.image_path) == list(src.image_path)
    assert read_meta("out/masks/manifest.parquet")["skipped"].startswith("images source")


def test_empty_composite_leaves_crops_unmasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plate = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Path("bg").mkdir()
    cv2.imwrite("bg/plate.png", plate)
    box = (20, 10, 50, 40)
    crop = crop_square(plate, square_box(box, 0.1), 32)       # nothing in front of the belt
    src = write_images(Path("detect"), [crop, crop], DETECT, product_id="p0", background_path="bg/plate.png",
                       box_x0=box[0], box_y0=box[1], box_x1=box[2], box_y1=box[3])
    report = masks.run(_params(), Path("detect"), Path("out/masks"))
    df = read_manifest("out/masks/manifest.parquet", MASKS)
    assert list(df.image_path) == list(src.image_path) and df.composite_mask_path.isna().all()
    assert df.fg_mask_path.notna().all()
    assert any("1 product/camera composite(s) empty" in n for n in report.notes)


def test_box_in_crop_marks_the_box_where_detect_cut_around_it():
    box = (20, 10, 60, 30)                                        # 40 x 20, margin 0.1 -> square side 48
    m = masks.box_in_crop(box, 0.1, 96, grow=0.0)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max() + 1) == (8, 88) and (ys.min(), ys.max() + 1) == (28, 68)
    assert masks.box_in_crop(box, 0.1, 96).sum() > m.sum()      # grown a little by default
