"""bench/small_defects_layout.py: MVTec layout, one mask per synthetic defect, small coverage on the product, deterministic."""
import csv
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "small_defects_layout.py"
SIDE, CENTRE, RADIUS = 128, 64, 40


def _load():
    spec = importlib.util.spec_from_file_location("small_defects_layout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _goods(root: Path, n_train: int = 9, n_test: int = 3) -> Path:
    """grey background + a dark textured disc (the product), a little different in each image"""
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    disc = (yy - CENTRE) ** 2 + (xx - CENTRE) ** 2 <= RADIUS ** 2
    for origin, n in (("train", n_train), ("test", n_test)):
        (root / origin / "good").mkdir(parents=True)
        for i in range(n):
            im = 200 + rng.normal(0, 1.5, (SIDE, SIDE))
            im[disc] = 70 + 15 * i % 40 + rng.normal(0, 10, int(disc.sum()))
            cv2.imwrite(str(root / origin / "good" / f"{i:03d}.png"), np.clip(im, 0, 255).astype(np.uint8))
    return root


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (str(p.readlink()) if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def test_build_layout_masks_coverage_and_determinism(tmp_path):
    mod = _load()
    src = _goods(tmp_path / "src")
    info = mod.build(src, tmp_path / "a", seed=3, n_test_good=3, n_defect=6)
    out = tmp_path / "a"
    assert info["train/good"] == 3 and info["test/good"] == 3
    assert all(info[f"test/{t}"] == 2 for t in mod.TYPES)
    assert all(p.is_symlink() for p in (out / "train" / "good").iterdir())
    assert (out / "SYNTHETIC.txt").read_text().startswith("SYNTHETIC DEFECTS")
    rows = list(csv.DictReader((out / "defects.csv").open()))
    assert len(rows) == 6
    images = {str(p.relative_to(out)) for t in mod.TYPES for p in (out / "test" / t).iterdir()}
    masks = {str(p.relative_to(out)) for t in mod.TYPES for p in (out / "ground_truth" / t).iterdir()}
    assert images == {r["file"] for r in rows}
    assert masks == {f.replace("test/", "ground_truth/", 1).replace(".png", "_mask.png") for f in images}
    sources = {r["file"]: r["source"] for r in csv.DictReader((out / "sources.csv").open())}
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    disc = (yy - CENTRE) ** 2 + (xx - CENTRE) ** 2 <= RADIUS ** 2
    for r in rows:
        im = cv2.imread(str(out / r["file"]), cv2.IMREAD_UNCHANGED)
        m = cv2.imread(str(out / r["file"].replace("test/", "ground_truth/", 1).replace(".png", "_mask.png")),
                       cv2.IMREAD_UNCHANGED)
        orig = cv2.imread(sources[r["file"]], cv2.IMREAD_UNCHANGED)
        assert im.shape == m.shape == orig.shape and set(np.unique(m)) == {0, 255}
        frac = np.count_nonzero(m) / m.size
        assert 0 < frac < 0.01 and abs(frac - float(r["covered_fraction"])) < 1e-9
        changed = im != orig
        assert changed[m > 0].mean() > 0.5  # the mask marks pixels the defect changed
        assert not changed[cv2.dilate(m, np.ones((9, 9), np.uint8)) == 0].any()  # and nothing else changed
        assert disc[m > 0].mean() >= 0.98  # on the product, not on the background
    mod.build(src, tmp_path / "b", seed=3, n_test_good=3, n_defect=6)
    assert _tree(out) == _tree(tmp_path / "b")
    mod.build(src, tmp_path / "c", seed=4, n_test_good=3, n_defect=6)
    assert _tree(out) != _tree(tmp_path / "c")


def test_refuses_small_pool_and_repo_output(tmp_path):
    mod = _load()
    src = _goods(tmp_path / "src", 4, 2)
    with pytest.raises(SystemExit, match=r"good pool has 6 images \(train/good 4 \+ test/good 2\)"):
        mod.build(src, tmp_path / "out", n_test_good=3, n_defect=3)
    with pytest.raises(SystemExit, match="inside the repository"):
        mod.build(src, SCRIPT.parents[1] / "not_here")
    assert not (tmp_path / "out").exists() and not (SCRIPT.parents[1] / "not_here").exists()
