"""Frames stage on the tiny demo: passes found, centre frames, labels, bad and empty videos."""
from __future__ import annotations

import logging
import shutil
import sys
import types

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow import frames
from defectflow.config import FramesParams, Params, SourceParams
from defectflow.fsutil import read_image
from defectflow.manifest import FRAMES, ITEMS, read_manifest, read_meta
from defectflow.sources import demo
from defectflow.sources.videos import VideoReadError, VideoSourceError, load_passes, load_videos
from defectflow.stage import manifest_path


def _params(path, kind="videos", **frames_kw) -> Params:
    return Params(source=SourceParams(kind=kind, path=str(path), demo_size="tiny"), frames=FramesParams(**frames_kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    src = root / "demo"
    with pytest.raises(VideoSourceError, match="no demo videos here"):
        frames.run(_params(src, kind="demo"), src, root / "out")
    demo.generate(src, size="tiny", seed=0)
    report = frames.run(_params(src, kind="demo"), src, root / "out")
    df = read_manifest(manifest_path(root / "out"), FRAMES)
    return src, root / "out", df, report


@pytest.fixture
def truth_centres(tiny):
    boxes = pd.read_csv(tiny[0] / "truth" / "boxes.csv")
    return boxes[boxes["is_center"]].set_index(["run", "camera", "pass_index"])["frame_index"]


def _folder(tmp_path, videos: dict[str, bytes], label: str | None = None):
    """A videos folder holding ``videos`` (file name -> bytes), one camera each of run r0."""
    (tmp_path / "videos").mkdir(parents=True)
    rows = []
    for i, (name, data) in enumerate(videos.items()):
        (tmp_path / "videos" / name).write_bytes(data)
        rows.append(f"videos/{name},cam{i},r0,test" + (f",{label}" if label else ""))
    header = "video,camera,run,split" + (",label" if label else "")
    (tmp_path / "videos.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


def test_pass_count_per_camera_equals_truth(tiny, truth_centres):
    _, _, df, report = tiny
    found = df[df["is_center"]].groupby(["run", "camera"]).size()
    expected = truth_centres.groupby(level=[0, 1]).size()
    assert found.sort_index().to_dict() == expected.sort_index().to_dict()
    assert report.n_out == len(df) == 5 * len(truth_centres)


def test_centre_frames_near_truth(tiny, truth_centres):
    df = tiny[2]
    found = df[df["is_center"]].set_index(["run", "camera", "pass_index"])["frame_index"]
    diff = (found - truth_centres.loc[found.index]).abs()
    assert diff.max() <= 1, diff[diff > 1]


def test_window_frames_written(tiny):
    _, out, df, _ = tiny
    for _, g in df.groupby(["run", "camera", "pass_index"]):
        idx = sorted(g["frame_index"])
        centre = int(g.loc[g["is_center"], "frame_index"].iloc[0])
        assert g["is_center"].sum() == 1
        assert idx == list(range(centre - 2, centre + 3))             # window 5, centred
    assert df["item_id"].is_unique
    sample = df[df["pass_index"] == 1].head(5)
    imgs = [read_image(p) for p in sample["image_path"]]
    assert all(i.shape == (demo.HEIGHT, demo.WIDTH, 3) for i in imgs)
    assert not np.array_equal(imgs[0], imgs[-1])                        # distinct frames, not one buffer
    assert all(p.startswith(out.as_posix() + "/frames/") for p in df["image_path"])
    assert np.allclose(df["t_sec"], df["frame_index"] / demo.FPS)


def test_labels_follow_defect_cameras(tiny):
    src, _, df, _ = tiny
    passes = pd.read_csv(src / "passes.csv", keep_default_na=False).set_index(["run", "pass_index"])
    for row in df.itertuples():
        p = passes.loc[(row.run, row.pass_index)]
        assert row.product_id == p["product_id"] and row.split == p["split"]
        sees = p["label"] == "defect" and row.camera in p["defect_cameras"].split(";")
        assert row.label == ("defect" if sees else "good")
        if sees:
            assert row.defect_type == p["defect_type"]
        else:
            assert pd.isna(row.defect_type)
    assert set(df["source"]) == {"demo"}
    assert (df["label"] == "defect").any()
    assert set(df.loc[df["split"] == "train", "label"]) == {"good"}


def test_unreadable_video_error_names_file(tmp_path):
    folder = _folder(tmp_path / "src", {"broken.avi": b"not a video" * 50})
    with pytest.raises(VideoReadError, match="broken.avi"):
        frames.run(_params(folder), folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _truncated(tiny, tmp_path):
    data = (tiny[0] / "videos" / "train-00_cam0.avi").read_bytes()
    return _folder(tmp_path / "src", {"cut.avi": data[: len(data) // 2]})


def test_truncated_video_error_names_file(tiny, tmp_path):
    folder = _truncated(tiny, tmp_path)
    with pytest.raises(VideoReadError, match=r"cut\.avi.*truncated"):
        frames.run(_params(folder), folder, tmp_path / "out")


def test_warn_mode_keeps_frames_read_so_far(tiny, tmp_path, caplog):
    folder = _truncated(tiny, tmp_path)
    with caplog.at_level(logging.WARNING, logger="defectflow.frames"):
        report = frames.run(_params(folder, on_bad_video="warn"), folder, tmp_path / "out")
    df = read_manifest(manifest_path(tmp_path / "out"), FRAMES)
    meta = read_meta(manifest_path(tmp_path / "out"))
    bad = pd.read_json(pd.io.common.StringIO(meta["bad_videos"]))
    assert bad["video"].str.endswith("cut.avi").all() and len(bad) == 1
    n_read = int(bad["frames_read"].iloc[0])
    assert 2 <= df["pass_index"].nunique() < 6                           # the first half of 6 passes
    assert df["frame_index"].max() < n_read
    assert "truncated" in caplog.text and "cut.avi" in caplog.text
    assert any("cut.avi" in n for n in report.notes)
    assert set(df["product_id"]) <= {f"r0-p{k:03d}" for k in range(6)}  # no passes.csv: ids from the run
    assert set(df["label"]) == {"unknown"}


def test_video_without_pass_gives_empty_result(tmp_path, caplog):
    path = tmp_path / "still.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    rng = np.random.default_rng(0)
    still = rng.integers(60, 160, (120, 160, 3), dtype=np.uint8)
    for _ in range(30):
        writer.write(cv2.add(still, rng.integers(0, 4, still.shape, dtype=np.uint8)))
    writer.release()
    folder = _folder(tmp_path / "src", {"still.avi": path.read_bytes()}, label="good")
    with caplog.at_level(logging.WARNING, logger="defectflow.frames"):
        report = frames.run(_params(folder), folder, tmp_path / "out")
    df = read_manifest(manifest_path(tmp_path / "out"), FRAMES)
    assert len(df) == 0 and report.n_out == 0
    assert "no product pass" in caplog.text and "still.avi" in caplog.text
    assert "still.avi" in read_meta(manifest_path(tmp_path / "out"))["videos_without_passes"]


def test_region_restricts_motion(tiny, tmp_path):
    src = tiny[0]
    folder = tmp_path / "src"
    (folder / "videos").mkdir(parents=True)
    shutil.copy(src / "videos" / "val-00_cam2.avi", folder / "videos")
    (folder / "videos.csv").write_text("video,camera,run,split\nvideos/val-00_cam2.avi,cam2,val-00,val\n")
    shutil.copy(src / "passes.csv", folder / "passes.csv")
    frames.run(_params(folder, region=(0.0, 0.0, 1.0, 0.15)), folder, tmp_path / "sky")  # above the products
    assert len(read_manifest(manifest_path(tmp_path / "sky"), FRAMES)) == 0
    frames.run(_params(folder, region=(0.25, 0.3, 0.75, 0.95)), folder, tmp_path / "belt")
    df = read_manifest(manifest_path(tmp_path / "belt"), FRAMES)
    assert df["pass_index"].nunique() == 4 and df["split"].eq("val").all()


def test_images_source_forwards_items(tmp_path, monkeypatch):
    items = pd.DataFrame({"item_id": ["a", "b"], "product_id": ["a", "b"], "run": "bottle", "camera": "cam0",
                          "split": ["train", "test"], "label": ["good", "defect"], "defect_type": [None, "crack"],
                          "image_path": ["x/a.png", "x/b.png"], "gt_mask_path": None, "source": "images"})
    fake = types.ModuleType("defectflow.sources.images")
    fake.load_items = lambda params: items[ITEMS.names]
    monkeypatch.setitem(sys.modules, "defectflow.sources.images", fake)
    report = frames.run(_params(tmp_path, kind="images"), tmp_path, tmp_path / "out")
    df = read_manifest(manifest_path(tmp_path / "out"), FRAMES)
    assert df["is_center"].all() and df["video_path"].isna().all() and list(df["item_id"]) == ["a", "b"]
    assert read_meta(manifest_path(tmp_path / "out"))["skipped"] == "images source: no video to decode"
    assert any("no video to decode" in n for n in report.notes)


def test_videos_folder_errors_name_the_file(tiny, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    with pytest.raises(VideoSourceError, match=r"videos\.csv: file not found"):
        load_videos(folder)
    (folder / "videos.csv").write_text("video,camera,run\nvideos/a.avi,cam0,r0\n")
    with pytest.raises(VideoSourceError, match=r"videos\.csv: missing column\(s\) \['split'\]"):
        load_videos(folder)
    (folder / "videos.csv").write_text("video,camera,run,split\nvideos/a.avi,cam0,r0,tset\n")
    with pytest.raises(VideoSourceError, match=r"'split' has invalid value\(s\) \['tset'\]"):
        load_videos(folder)
    (folder / "videos.csv").write_text("video,camera,run,split\nvideos/a.avi,cam0,r0,test\n")
    with pytest.raises(VideoSourceError, match=r"not found, e\.g\. .*videos/a\.avi"):
        load_videos(folder)
    (folder / "passes.csv").write_text("run,pass_index,product_id,label,defect_type,split,defect_cameras\n"
                                       "r0,0,p0,broken,,test,\n")
    with pytest.raises(VideoSourceError, match=r"passes\.csv: column 'label'"):
        load_passes(folder)
    assert load_passes(tiny[0])["pass_index"].dtype == "int64"
