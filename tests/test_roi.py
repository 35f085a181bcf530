"""roi: circle finding on drawn circles, the circle crop / CLAHE / k-means mask, none and mask methods."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from vision_scene import write_images

from defectflow import roi
from defectflow.config import params_from_dict
from defectflow.manifest import MASKS, ROI, read_manifest, read_meta


def drawn(kind, cx, cy, r, size=(160, 160), seed=0):
    """A noisy background with a drawn round part: disc, ring (dark coating inside), occluded, or crossed."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 6, size + (3,)).clip(0, 255).astype(np.uint8)
    cv2.circle(img, (cx, cy), r, (170, 180, 190), -1)
    if kind in ("ring", "crossed"):
        cv2.circle(img, (cx, cy), int(r * 0.6), (40, 40, 40), -1)
    if kind == "crossed":
        cv2.line(img, (0, 20), (size[1], size[0] - 30), (255, 255, 255), 2)
    if kind == "occluded":
        cv2.rectangle(img, (0, cy + r // 2), (size[1], size[0]), (100, 100, 100), -1)
    return img


@pytest.mark.parametrize("kind,cx,cy,r,size", [
    ("disc", 80, 80, 50, (160, 160)),
    ("disc", 62, 71, 33, (120, 160)),
    ("ring", 90, 75, 60, (160, 180)),
    ("occluded", 82, 70, 45, (160, 160)),
    ("crossed", 80, 84, 55, (160, 160)),
])
def test_find_circle_centre_within_2_percent(kind, cx, cy, r, size):
    found = roi.find_circle(drawn(kind, cx, cy, r, size))
    assert found is not None
    fx, fy, fr = found
    assert np.hypot(fx - cx, fy - cy) < 0.02 * r
    assert abs(fr - r) < 0.03 * r


def test_find_circle_takes_a_slightly_flattened_outer_rim():
    """A real rim seen a little off-axis is an ellipse of roundness ~0.97; it is still the
    largest circle, not the truly round inner ring (the MVTec bottle case)."""
    img = np.random.default_rng(2).normal(230, 4, (300, 300, 3)).clip(0, 255).astype(np.uint8)
    cv2.ellipse(img, (150, 148), (132, 128), 30, 0, 360, (90, 90, 90), -1)       # the bottle's outer rim
    cv2.circle(img, (151, 149), 80, (160, 140, 120), 6)                            # an inner ring
    cv2.circle(img, (151, 149), 60, (30, 30, 30), -1)                              # the dark opening
    found = roi.find_circle(img)
    assert found is not None
    assert np.hypot(found[0] - 150, found[1] - 148) < 0.02 * 130
    assert 126 <= found[2] <= 134


@pytest.mark.parametrize("name", ["blank", "noise", "square", "small"])
def test_find_circle_none_without_a_big_circle(name):
    rng = np.random.default_rng(1)
    img = {
        "blank": np.full((120, 160, 3), 90, np.uint8),
        "noise": rng.normal(100, 30, (120, 160, 3)).clip(0, 255).astype(np.uint8),
        "square": cv2.rectangle(np.full((120, 160, 3), 90, np.uint8), (40, 20), (120, 100), (220, 220, 220), -1),
        "small": cv2.circle(np.full((120, 160, 3), 90, np.uint8), (80, 60), 10, (220, 220, 220), -1),
    }[name]
    assert roi.find_circle(img) is None


def test_circle_stage_crops_enhances_and_segments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = [drawn("ring", 70, 80, 50), drawn("disc", 90, 70, 40), np.full((160, 160, 3), 90, np.uint8)]
    src = write_images(Path("masks"), images, MASKS)
    params = params_from_dict({"roi": {"method": "circle", "kmeans": True}})
    report = roi.run(params, Path("masks"), Path("out/roi"))
    df = read_manifest("out/roi/manifest.parquet", ROI)

    assert list(df.roi_found) == [True, True, False]
    assert df.image_path.iloc[2] == src.image_path.iloc[2] and df.roi_mask_path.isna().iloc[2]
    assert any("1 without a circle" in n for n in report.notes)
    assert read_meta("out/roi/manifest.parquet")["method"] == "circle"
    ring = cv2.imread(df.image_path.iloc[0])
    assert ring.shape == (160, 160, 3)
    assert (ring[:8, :8] == 0).all() and (ring[-8:, -8:] == 0).all()     # outside the circle is zeroed
    c = 80
    assert ring[c - 5:c + 5, c - 5:c + 5].mean() < ring[c, c + 64:c + 72].mean()   # dark coating, bright rim
    seg = cv2.imread(df.roi_mask_path.iloc[0], cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(seg)) <= {0, 255}
    assert (seg[c - 20:c + 20, c - 20:c + 20] == 255).all()    # the coating cluster (holds the centre)
    assert (seg[c, c + 60:c + 72] == 0).all()                  # the rim is the other cluster
    assert (seg[:8, :8] == 0).all()


def test_none_method_forwards_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_images(Path("masks"), [np.zeros((20, 20, 3), np.uint8)], MASKS)
    roi.run(params_from_dict({"roi": {"method": "none"}}), Path("masks"), Path("out/roi"))
    df = read_manifest("out/roi/manifest.parquet", ROI)
    assert list(df.image_path) == list(src.image_path) and df.roi_found.isna().all()
    assert read_meta("out/roi/manifest.parquet")["skipped"].startswith("roi.method=none")


def test_mask_method_applies_the_composite_where_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    comp = np.zeros((40, 40), np.uint8)
    comp[10:30, 10:30] = 255
    Path("comp").mkdir()
    cv2.imwrite("comp/c.png", comp)
    white = np.full((40, 40, 3), 255, np.uint8)
    already = white.copy()
    already[comp == 0] = 0
    src = write_images(Path("masks"), [white, already, white], MASKS,
                       composite_mask_path=["comp/c.png", "comp/c.png", None])
    report = roi.run(params_from_dict({"roi": {"method": "mask"}}), Path("masks"), Path("out/roi"))
    df = read_manifest("out/roi/manifest.parquet", ROI)
    out0 = cv2.imread(df.image_path.iloc[0])
    assert (out0 == already).all() and df.image_path.iloc[0].startswith("out/roi/")
    assert df.image_path.iloc[1] == src.image_path.iloc[1]            # already masked: forwarded
    assert df.image_path.iloc[2] == src.image_path.iloc[2]            # no composite: forwarded
    assert list(df.roi_mask_path.iloc[:2]) == ["comp/c.png"] * 2
    assert any("1 image(s) have no composite mask" in n for n in report.notes)
