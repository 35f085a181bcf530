"""Ingest: valid new good samples join the source folder, duplicates and bad files go to quarantine
with a reason, nothing is deleted, names cannot leave the data folder."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import nightly_fakes as nf
from defectflow import frames
from defectflow.cli import main as cli
from defectflow.config import Params, SourceParams, load_params
from defectflow.ingest import IngestError, ingest
from defectflow.manifest import FRAMES, read_manifest
from defectflow.sources import demo
from defectflow.sources.videos import load_videos
from defectflow.stage import manifest_path


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = nf.make_project(tmp_path)
    (p / "data" / "inbox").mkdir()
    return p


def _quarantined(p: Path) -> dict[str, str]:
    return {f.name.removesuffix(".reason.txt"): f.read_text() for f in (p / "data" / "quarantine").rglob("*.reason.txt")}


def test_good_videos_added_duplicates_and_bad_ones_quarantined(project):
    inbox = project / "data" / "inbox"
    nf.write_video(inbox / "n1_cam0.avi", seed=1)
    nf.write_video(inbox / "n1_cam1.avi", seed=2)
    (inbox / "again_cam0.avi").write_bytes((project / "data/src/videos/r0_cam0.avi").read_bytes())  # already in data
    nf.write_video(inbox / "short_cam0.avi", n_frames=2, seed=3)                                    # 0.2 s
    nf.write_video(inbox / "tiny_cam0.avi", size=(16, 16), seed=4)
    (inbox / "broken_cam0.avi").write_bytes(b"\x00" * 100)
    (inbox / "no camera.avi").write_bytes(b"x")
    outside = project / "secret.avi"
    nf.write_video(outside, seed=5)
    os.symlink(outside, inbox / "link_cam0.avi")
    params = load_params(project / "params.yaml")
    rep = ingest(params, project=project)
    assert sorted(rep.added) == ["n1_cam0.avi", "n1_cam1.avi"] and rep.duplicates == ["again_cam0.avi"]
    q = _quarantined(project)
    assert "duplicate" in q["again_cam0.avi"] and "videos/r0_cam0.avi" in q["again_cam0.avi"]
    assert "duration 0.20s" in q["short_cam0.avi"] and "size 16x16" in q["tiny_cam0.avi"]
    assert "open" in q["broken_cam0.avi"] or "frame" in q["broken_cam0.avi"]
    assert "unsafe name" in q["no camera.avi"] and "symlinks are not followed" in q["link_cam0.avi"]
    assert outside.is_file() and not any(inbox.iterdir())                       # inbox emptied, nothing deleted
    assert (project / "data/quarantine" / rep.batch / "link_cam0.avi").is_symlink()
    videos = load_videos(project / "data" / "src")                              # still a valid videos source
    new = videos[videos.run == f"{rep.batch}-n1"]
    assert sorted(new.camera) == ["cam0", "cam1"] and set(new.split) == {"train"} and set(new.label) == {"good"}
    assert all(Path(v).is_file() for v in new.path)
    log = pd.read_csv(project / "data/src/ingest.csv", keep_default_na=False)
    assert (log.status == "baseline").sum() == 3 and (log.status == "added").sum() == 2
    assert set(log[log.status == "rejected"].inbox_name) >= {"short_cam0.avi", "broken_cam0.avi"}
    # the same file delivered again the next night is a duplicate of the one ingested tonight
    (inbox / "n1_cam0.avi").write_bytes(Path(new[new.camera == "cam0"].path.iloc[0]).read_bytes())
    rep2 = ingest(params, project=project)
    assert rep2.duplicates == ["n1_cam0.avi"] and not rep2.added


def test_images_source_checks_channels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "mv" / "train" / "good"
    good.mkdir(parents=True)
    cv2.imwrite(str(good / "000.png"), np.full((64, 64, 3), 100, np.uint8))
    (tmp_path / "params.yaml").write_text("source: {kind: images, path: mv}\n")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cv2.imwrite(str(inbox / "a.png"), np.full((64, 64, 3), 7, np.uint8))
    cv2.imwrite(str(inbox / "grey.png"), np.full((64, 64), 7, np.uint8))
    assert cli(["ingest", "inbox", "--params", "params.yaml"]) == 0
    names = sorted(p.name for p in good.iterdir())
    assert len(names) == 2 and names[1].startswith("ingest-") and names[1].endswith("-a.png")
    assert "1 channel(s)" in _quarantined_any(tmp_path)["grey.png"]


def _quarantined_any(root: Path) -> dict[str, str]:
    return {f.name.removesuffix(".reason.txt"): f.read_text() for f in root.rglob("*.reason.txt")}


def test_all_rejected_is_an_error_and_the_data_is_untouched(project):
    (project / "data" / "inbox" / "x_cam0.avi").write_bytes(b"junk")
    before = (project / "data/src/videos.csv").read_text()
    with pytest.raises(IngestError, match=r"rejected every file \(1\)"):
        ingest(load_params(project / "params.yaml"), project=project)
    assert (project / "data/src/videos.csv").read_text() == before
    assert "x_cam0.avi" in _quarantined(project)


def test_missing_inbox_names_it(project):
    with pytest.raises(IngestError, match="nope: inbox folder not found"):
        ingest(load_params(project / "params.yaml"), "nope", project=project)


def _retouch(src: Path, dst: Path, value: int) -> None:
    """A copy of ``src`` with other bytes (one corner pixel changed), the same products passing."""
    cap = cv2.VideoCapture(str(src))
    fps, w, h = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    ok, frame = cap.read()
    while ok:
        frame[0, 0] = value
        out.write(frame)
        ok, frame = cap.read()
    cap.release()
    out.release()


def test_ingested_videos_are_labelled_from_videos_csv_without_a_passes_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "demo"
    demo.generate(src, size="tiny", seed=0)
    (tmp_path / "inbox").mkdir()
    for run, value in (("n1", 7), ("n2", 9)):
        _retouch(src / "videos" / "train-00_cam0.avi", tmp_path / "inbox" / f"{run}_cam0.avi", value)
    params = Params(source=SourceParams(kind="demo", path="demo", demo_size="tiny"))
    rep = ingest(params, "inbox", project=tmp_path)
    assert sorted(rep.added) == ["n1_cam0.avi", "n2_cam0.avi"]
    n1, n2 = f"{rep.batch}-n1", f"{rep.batch}-n2"
    videos = pd.read_csv(src / "videos.csv", dtype=str, keep_default_na=False)
    videos.loc[videos.run == n2, "label"] = ""             # a row without a label still needs passes.csv
    videos.to_csv(src / "videos.csv", index=False)
    with caplog.at_level(logging.INFO, logger="defectflow"):
        report = frames.run(params, src, tmp_path / "out", runs=[n1, n2])
    df = read_manifest(manifest_path(tmp_path / "out"), FRAMES)
    good = df[df.run == n1]
    assert len(good) and set(good.label) == {"good"} and set(good.split) == {"train"}
    assert good.product_id.str.startswith(f"{n1}-p").all()
    assert set(df[df.run == n2].label) == {"unknown"}
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    missing = [m for m in warned if "not in passes.csv" in m]
    assert len(missing) == 1 and n2 in missing[0] and n1 not in missing[0], warned
    assert not any("passes.csv lists" in m for m in warned), warned       # no expected count for unlisted runs
    assert any("labelled from videos.csv" in n and n1 in n and n2 not in n for n in report.notes), report.notes
