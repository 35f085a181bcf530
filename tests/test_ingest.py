"""Ingest: valid new good samples join the source folder, duplicates and bad files go to quarantine
with a reason, nothing is deleted, names cannot leave the data folder."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import nightly_fakes as nf
from defectflow.cli import main as cli
from defectflow.config import load_params
from defectflow.ingest import IngestError, ingest
from defectflow.sources.videos import load_videos


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
