"""The synthetic demo: files, counts, determinism, defect visibility."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow.sources import demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    info = demo.generate(out, size="tiny", seed=0)
    return out, info


def _frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            return frames
        frames.append(f)


def test_files_present_and_consistent(tiny):
    out, info = tiny
    videos = pd.read_csv(out / "videos.csv")
    assert list(videos.columns) == ["video", "camera", "run", "split"]
    assert len(videos) == info["counts"]["videos"] == 3 * 4
    runs = {r["run"]: r for r in info["runs"]}
    for row in videos.itertuples():
        cap = cv2.VideoCapture(str(out / row.video))
        assert cap.isOpened(), row.video
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == runs[row.run]["frames"]
        assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (demo.WIDTH, demo.HEIGHT)
    on_disk = json.loads((out / "demo.json").read_text())
    assert on_disk == {k: v for k, v in info.items() if k != "seconds"}
    boxes = pd.read_csv(out / "truth" / "boxes.csv")
    centres = boxes[boxes["is_center"]]
    assert len(centres) == info["counts"]["passes"]
    assert not centres.duplicated(["run", "camera", "pass_index"]).any()
    assert len(list((out / "truth" / "silhouettes").glob("*.png"))) == info["counts"]["passes"]


def test_counts_and_splits(tiny):
    out, info = tiny
    passes = pd.read_csv(out / "passes.csv", keep_default_na=False)
    sizes = demo.SIZES["tiny"]
    for split, (n_runs, n_products) in sizes.items():
        part = passes[passes["split"] == split]
        assert part["run"].nunique() == n_runs
        assert len(part) == n_runs * n_products
        share = (part["label"] == "defect").mean()
        if split == "train":
            assert share == 0
        else:
            assert 0.3 <= share <= 0.6
    assert passes["product_id"].is_unique
    assert info["counts"]["products"] == len(passes)
    assert info["counts"]["defective"] == int((passes["label"] == "defect").sum())


def test_defect_cameras(tiny):
    out, _ = tiny
    passes = pd.read_csv(out / "passes.csv", keep_default_na=False)
    for row in passes.itertuples():
        cams = [c for c in row.defect_cameras.split(";") if c]
        if row.label == "defect":
            assert row.defect_type in demo.DEFECT_TYPES
            assert 1 <= len(cams) <= 2 and set(cams) <= set(demo.CAMERAS)
        else:
            assert cams == [] and row.defect_type == ""


def test_silhouette_matches_centre_box(tiny):
    out, _ = tiny
    boxes = pd.read_csv(out / "truth" / "boxes.csv")
    for row in boxes[boxes["is_center"]].head(8).itertuples():
        sil = cv2.imread(str(out / "truth" / "silhouettes" / f"{row.run}_{row.camera}_{row.pass_index:03d}.png"),
                         cv2.IMREAD_GRAYSCALE)
        assert sil.shape == (demo.HEIGHT, demo.WIDTH) and set(np.unique(sil)) <= {0, 255}
        ys, xs = np.nonzero(sil)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (row.x0, row.y0, row.x1, row.y1)


def test_deterministic(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    demo.generate(again, size="tiny", seed=0)
    for rel in ("passes.csv", "videos.csv", "truth/boxes.csv", "demo.json"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    for rel in ("videos/val-00_cam1.avi", "videos/test-00_cam3.avi"):
        a, b = _frames(out / rel), _frames(again / rel)
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
    other = tmp_path / "other"
    demo.generate(other, size="tiny", seed=1)
    assert (other / "truth/boxes.csv").read_bytes() != (out / "truth/boxes.csv").read_bytes()


@pytest.mark.parametrize("kind", demo.DEFECT_TYPES)
def test_defect_is_visible_only_where_listed(kind):
    rng = np.random.default_rng(3)
    p = demo._plan_products("r", "test", 1, rng, [kind])[0]
    clean = dataclasses.replace(p, defect_type=None)
    seen = p.defect_cameras()
    assert seen
    for cam in demo.CAMERAS:
        rgb, alpha = demo.render_sprite(p, cam, 0.2)
        ref, _ = demo.render_sprite(clean, cam, 0.2)
        changed = int((np.abs(rgb - ref).max(axis=2) > 30).sum())
        if cam in seen:
            assert changed >= 50, (kind, cam, changed)          # a clearly visible mark, not sub-pixel
            assert changed < 0.15 * (alpha > 0.5).sum()           # but a local one
        else:
            assert changed == 0


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="demo size"):
        demo.generate(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()
