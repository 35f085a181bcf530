"""Work units: per-unit cache (a rerun after adding a video recomputes only it), order, failures."""
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

from defectflow import detect, frames
from defectflow.config import Params
from defectflow.sources import demo
from defectflow.sources.videos import VideoReadError
from defectflow.units import serial_map
from defectflow.units.chunks import run_chunks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    demo.generate(root / "demo", size="tiny", seed=0)
    return root / "demo"


def _source(tiny: Path, dst: Path, videos: list[str]) -> Path:
    """A videos folder listing ``videos`` (names of the tiny demo's videos, in this order)."""
    dst.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(tiny / "videos.csv").set_index("video")
    rows = table.loc[videos].reset_index()
    for v in rows.video:
        (dst / v).parent.mkdir(parents=True, exist_ok=True)
        if not (dst / v).exists():
            shutil.copy(tiny / v, dst / v)
    rows.to_csv(dst / "videos.csv", index=False)
    shutil.copy(tiny / "passes.csv", dst / "passes.csv")
    return dst


def _params(src: Path, cache: bool, **scale) -> Params:
    return Params.model_validate({"source": {"kind": "videos", "path": str(src)},
                                  "scale": {"unit_cache": cache, **scale}})


def _run(p: Params, src: Path, mapper=None):
    reports = [frames.run(p, src, Path("out/frames"), mapper=mapper),
               detect.run(p, Path("out/frames"), Path("out/detect"), mapper=mapper)]
    return reports, {s: pd.read_parquet(f"out/{s}/manifest.parquet") for s in ("frames", "detect")}


def _digests(folder: str) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != "manifest.parquet"}


def _note(report, word="unit(s)") -> str:
    return next(n for n in report.notes if word in n)


def test_rerun_after_a_new_video_recomputes_only_its_units(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEFECTFLOW_CACHE", str(tmp_path / "cache"))
    old = ["videos/train-00_cam0.avi", "videos/train-00_cam1.avi", "videos/train-00_cam2.avi"]
    src = _source(tiny, tmp_path / "src", old)
    reports, _ = _run(_params(src, True), src)
    assert all("0 from the unit cache, 3 computed" in _note(r) for r in reports)
    _source(tiny, src, ["videos/train-00_cam3.avi", *old])          # the new video first: every position moves
    reports, cached = _run(_params(src, True), src)
    assert all("3 from the unit cache, 1 computed" in _note(r) for r in reports)
    files = {s: _digests(f"out/{s}") for s in ("frames", "detect")}
    _, fresh = _run(_params(src, False), src)                        # no cache: computed from scratch
    for stage in ("frames", "detect"):
        pd.testing.assert_frame_equal(cached[stage], fresh[stage])
        assert files[stage] == _digests(f"out/{stage}")
    assert fresh["frames"].camera.iloc[0] == "cam3" and set(fresh["detect"].camera) == {"cam0", "cam1", "cam2", "cam3"}


def test_manifests_do_not_depend_on_the_order_units_run_in(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _source(tiny, tmp_path / "src", ["videos/val-00_cam0.avi", "videos/val-00_cam1.avi"])

    def backwards(fn, units):
        done = {u.name: fn(u) for u in reversed(units)}
        return [done[u.name] for u in units]

    _, serial = _run(_params(src, False), src, serial_map)
    _, reverse = _run(_params(src, False), src, backwards)
    for stage in serial:
        pd.testing.assert_frame_equal(serial[stage], reverse[stage])


def _with_bad_video(tiny, tmp_path) -> Path:
    src = _source(tiny, tmp_path / "src", ["videos/test-00_cam0.avi", "videos/test-00_cam1.avi"])
    (src / "videos/test-00_cam1.avi").write_bytes(b"not a video at all" * 100)
    return src


def test_quarantine_lets_the_other_units_finish(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _with_bad_video(tiny, tmp_path)
    report = frames.run(_params(src, False, on_unit_error="quarantine"), src, Path("out/frames"))
    df = pd.read_parquet("out/frames/manifest.parquet")
    assert len(df) and set(df.camera) == {"cam0"}
    listed = pd.read_json("out/frames/quarantine.json")
    assert list(listed.unit) == ["test-00_cam1"] and "test-00_cam1.avi" in listed.error[0]
    assert "1 quarantined" in _note(report)


def test_stop_fails_the_stage_naming_the_unit_and_keeps_the_old_output(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _source(tiny, tmp_path / "good", ["videos/test-00_cam0.avi"])
    frames.run(_params(good, False), good, Path("out/frames"))
    before = pd.read_parquet("out/frames/manifest.parquet")
    src = _with_bad_video(tiny, tmp_path)
    with pytest.raises(VideoReadError, match="test-00_cam1.avi") as err:
        frames.run(_params(src, False), src, Path("out/frames"))
    assert any("frames unit test-00_cam1" in n for n in err.value.__notes__)
    pd.testing.assert_frame_equal(before, pd.read_parquet("out/frames/manifest.parquet"))


def test_score_chunks_keep_runs_whole_and_frames_takes_one_chunk(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_chunks(tiny, 8) == [["train-00", "val-00"], ["test-00"]]     # 4 cameras a run
    assert run_chunks(tiny, 1) == [["train-00"], ["val-00"], ["test-00"]]    # a run is never split
    src = _source(tiny, tmp_path / "src", ["videos/train-00_cam0.avi", "videos/val-00_cam0.avi"])
    frames.run(_params(src, False), src, Path("out/all"))
    frames.run(_params(src, False), src, Path("out/val"), runs=["val-00"])
    every = pd.read_parquet("out/all/manifest.parquet")
    chunk = pd.read_parquet("out/val/manifest.parquet")
    expected = every[every.run == "val-00"].reset_index(drop=True)
    expected["image_path"] = expected.image_path.str.replace("out/all/", "out/val/")
    expected["tracks_path"] = expected.tracks_path.str.replace("out/all/", "out/val/")
    pd.testing.assert_frame_equal(chunk, expected)
