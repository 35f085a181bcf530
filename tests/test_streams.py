"""Continuous product streams end to end on the tiny stream demo: each product captured once."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from defectflow import detect, frames, masks
from defectflow.annotate import GREEN, RED, annotate_videos, logged_tracks
from defectflow.config import params_from_dict
from defectflow.manifest import DETECT, FRAMES, MASKS, read_manifest, read_meta
from defectflow.sources import demo, demo_streams
from defectflow.stage import manifest_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from vision_streams import capture_figures, id_switches  # noqa: E402


def _params(src, **frames_kw):
    return params_from_dict({"source": {"kind": "demo", "path": str(src), "demo_kind": "streams", "demo_size": "tiny"},
                             "frames": {**demo_streams.frames_params(), **frames_kw}, "detect": {"crop_size": 64}})


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    info = demo.generate(root / "demo", size="tiny", seed=0, kind="streams")
    report = frames.run(_params(root / "demo"), root / "demo", root / "frames")
    return root, info, read_manifest(manifest_path(root / "frames"), FRAMES), report


def test_stream_demo_files_and_truth(streams):
    root, info, _, _ = streams
    src = root / "demo"
    videos, passes = pd.read_csv(src / "videos.csv"), pd.read_csv(src / "passes.csv", keep_default_na=False)
    boxes = pd.read_csv(src / "truth" / "boxes.csv")
    assert sorted(videos["camera"].unique()) == ["belt", "lanes"] and info["kind"] == "streams"
    assert len(passes) == info["counts"]["passes"] == 30
    assert set(passes.loc[passes["run"].str.contains("lanes"), "lane"]) == {"near", "far"}
    assert passes["product_id"].is_unique
    centres = boxes[boxes["is_center"]]
    assert len(centres) == len(passes) and not centres.duplicated(["run", "lane", "pass_index"]).any()
    in_view = boxes.groupby(["run", "lane", "frame_index"]).size()
    assert in_view.max() >= 4                                      # several products in view at once
    dense = boxes[boxes["run"].str.contains("dense")].sort_values(["frame_index", "x0"])
    gaps = [int(b) - int(a) for _, g in dense.groupby("frame_index") for a, b in zip(g["x1"][:-1], g["x0"][1:])]
    assert min(gaps) <= 1                                          # touching products
    far = boxes[(boxes["lane"] == "far")]
    widths = far.assign(w=far["x1"] - far["x0"])[far["x0"] > 0].groupby("pass_index")["w"]
    assert (widths.max() - widths.min()).median() >= 3             # perspective: they shrink as they go away
    again = demo_streams.generate_streams(root / "again", size="tiny", seed=0)
    assert (root / "again" / "truth" / "boxes.csv").read_bytes() == (src / "truth" / "boxes.csv").read_bytes()
    assert again["counts"] == info["counts"]


def test_each_product_of_a_stream_captured_once(streams):
    root, _, df, report = streams
    truth = pd.read_csv(root / "demo" / "truth" / "boxes.csv")
    figs = capture_figures(truth, df)
    assert (figs["misses"], figs["duplicates"], figs["order_errors"]) == (0, 0, 0), figs
    assert figs["passes_found"] == figs["passes_expected"] == 30
    assert figs["centre_frame_err_max"] <= 2
    assert id_switches(truth, df) <= 2
    meta = read_meta(manifest_path(root / "frames"))
    assert sorted(yaml.safe_load(meta["lanes"])) == ["far", "main", "near"]
    assert any("30 product passes" in n for n in report.notes)


def test_stream_rows_carry_lane_track_and_box(streams):
    root, _, df, _ = streams
    passes = pd.read_csv(root / "demo" / "passes.csv", keep_default_na=False)
    lanes = df[df["run"].str.contains("lanes")]
    assert set(lanes["lane"]) == {"near", "far"} and set(df.loc[~df.index.isin(lanes.index), "lane"]) == {"main"}
    assert set(lanes["product_id"]) == set(passes.loc[passes["run"].str.contains("lanes"), "product_id"])
    assert lanes.loc[lanes["lane"] == "far", "product_id"].str.contains("-far-").all()
    assert df.groupby(["run", "lane", "pass_index"])["track_id"].nunique().eq(1).all()
    assert df.groupby(["run", "lane", "pass_index"]).size().eq(5).all()
    assert (df["track_x1"] > df["track_x0"]).all() and (df["track_y1"] > df["track_y0"]).all()
    log = pd.read_parquet(df["tracks_path"].iloc[0])
    assert list(log.columns) == frames.TRACK_LOG_COLUMNS and len(log) > 100


def test_detect_and_masks_follow_the_track_boxes(streams, tmp_path, monkeypatch):
    root, _, df, _ = streams
    monkeypatch.chdir(tmp_path)
    sub = df[df["run"].str.contains("dense")]
    src = Path("frames_in")
    from defectflow.manifest import write_manifest
    write_manifest(sub, FRAMES, src / "manifest.parquet")
    params = _params(root / "demo")
    detect.run(params, src, Path("detect"))
    det = read_manifest("detect/manifest.parquet", DETECT)
    assert len(det) == len(sub)
    truth = pd.read_csv(root / "demo" / "truth" / "boxes.csv").set_index(["run", "lane", "frame_index", "pass_index"])
    from vision_scene import iou
    ious = [iou((r.box_x0, r.box_y0, r.box_x1, r.box_y1),
                tuple(truth.loc[(r.run, r.lane, r.frame_index, r.pass_index), ["x0", "y0", "x1", "y1"]]))
            for r in det.itertuples()]
    assert np.median(ious) > 0.9 and min(ious) > 0.6               # one product each, never its neighbour
    plate = cv2.imread(det["background_path"].iloc[0])
    assert (plate[70:190].max(axis=2) > 170).mean() < 0.01          # wall and belt: no (bright) products in it
    masks.run(params, Path("detect"), Path("masks"))
    m = read_manifest("masks/manifest.parquet", MASKS)
    assert m.groupby("product_id")["composite_mask_path"].nunique().eq(1).all()
    comp = cv2.imread(m["composite_mask_path"].iloc[0], cv2.IMREAD_GRAYSCALE) > 0
    assert 0.2 < comp.mean() < 0.8


def test_norfair_backend_counts_the_streams_too(streams, tmp_path):
    root, _, _, _ = streams
    frames.run(_params(root / "demo", tracker="norfair"), root / "demo", tmp_path / "frames")
    df = read_manifest(manifest_path(tmp_path / "frames"), FRAMES)
    figs = capture_figures(pd.read_csv(root / "demo" / "truth" / "boxes.csv"), df)
    assert figs["misses"] + figs["duplicates"] <= 1, figs


def test_explicit_direction_and_counting_line(streams, tmp_path):
    root, _, _, _ = streams
    folder = tmp_path / "one"
    (folder / "videos").mkdir(parents=True)
    video = root / "demo" / "videos" / "train-dense-00_belt.avi"
    (folder / "videos.csv").write_text(f"video,camera,run,split\n{video.as_posix()},belt,r,train\n")
    frames.run(_params(folder, direction="left_to_right"), folder, tmp_path / "ltr")
    right = read_manifest(manifest_path(tmp_path / "ltr"), FRAMES)
    assert right["pass_index"].nunique() == 10
    frames.run(_params(folder, direction="right_to_left"), folder, tmp_path / "rtl")
    assert len(read_manifest(manifest_path(tmp_path / "rtl"), FRAMES)) == 0      # nothing travels that way
    lanes = [{"name": "main", "region": [0, 0, 1, 1], "line": [0.25, 0, 0.25, 1]}]
    frames.run(_params(folder, lanes=lanes), folder, tmp_path / "line")
    early = read_manifest(manifest_path(tmp_path / "line"), FRAMES)
    c_mid = right[right["is_center"]].sort_values("pass_index")
    c_early = early[early["is_center"]].sort_values("pass_index")
    assert len(c_early) == 10
    assert ((c_early["track_x0"].to_numpy() + c_early["track_x1"].to_numpy()) / 2 < 120).all()
    assert (c_early["frame_index"].to_numpy() < c_mid["frame_index"].to_numpy()).all()


def test_annotated_video_draws_every_track_with_its_id(streams, tmp_path):
    root, _, df, _ = streams
    rows = df[df["run"].str.contains("dense")]
    log = pd.read_parquet(rows["tracks_path"].iloc[0])
    tracks = logged_tracks(log)
    assert len(tracks) >= 10 and all(len(b) for b in tracks.values())
    key = next(iter(tracks))
    frames_of = sorted(tracks[key])
    assert frames_of == list(range(frames_of[0], frames_of[-1] + 1))   # every frame, between tracked ones too
    pids = rows["product_id"].unique()
    scored = pd.DataFrame({"product_id": pids, "camera": "belt", "score": [2.0] + [0.1] * (len(pids) - 1)})
    verdicts = pd.DataFrame({"product_id": pids, "verdict": ["defect"] + ["good"] * (len(pids) - 1)})
    out = annotate_videos(rows, scored, verdicts, threshold=1.0, out_dir=tmp_path / "videos")
    assert [p.name for p in out] == ["train-dense-00_belt.mp4"]
    cap = cv2.VideoCapture(str(out[0]))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    assert n == int(cv2.VideoCapture(rows["video_path"].iloc[0]).get(cv2.CAP_PROP_FRAME_COUNT))
    flagged = rows[rows["product_id"] == pids[0]].iloc[0]
    track = tracks[(flagged["lane"], int(flagged["track_id"]))]
    f = int(flagged["frame_index"])                                # a kept frame: the product in full view
    x0, y0, x1, y1 = track[f]
    cap.set(cv2.CAP_PROP_POS_FRAMES, f)
    img = cap.read()[1].astype(int)
    edge = img[(y0 + y1) // 2, max(x0, 1)]
    assert np.abs(edge - np.array(RED)).max() < 70                   # the flagged product's box is red
    good = rows[rows["product_id"] == pids[-1]].iloc[0]
    gx0, gy0, gx1, gy1 = tracks[(good["lane"], int(good["track_id"]))][int(good["frame_index"])]
    cap.set(cv2.CAP_PROP_POS_FRAMES, int(good["frame_index"]))
    img = cap.read()[1].astype(int)
    assert np.abs(img[(gy0 + gy1) // 2, max(gx0, 1)] - np.array(GREEN)).max() < 70


def test_example_params_match_the_demo():
    p = yaml.safe_load((ROOT / "examples" / "demo_streams" / "params.yaml").read_text())
    expected = demo_streams.frames_params()
    assert p["frames"]["lanes"] == expected["lanes"]
    assert p["frames"]["motion_threshold"] == expected["motion_threshold"]
    assert p["frames"]["region"] == expected["region"]
    assert p["source"]["demo_kind"] == "streams"
    with pytest.raises(Exception, match="demo kind"):
        demo.generate(Path("unused"), kind="belts")
