"""defectflow clean-temp: removes the temps killed runs left, keeps recent ones, and refuses while a
nightly run, ``defectflow gate`` or a dvc stage may be writing them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zc.lockfile

import nightly_fakes as nf
from defectflow.cli import main as cli
from defectflow.nightly import run_lock

HOUR = 3600


def _old(path: Path, seconds: float = 2 * HOUR) -> Path:
    t = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = nf.make_project(tmp_path)
    (p / "models" / ".model.ab12.tmp").mkdir(parents=True)
    (p / "models" / ".model.ab12.tmp" / "weights.bin").write_bytes(b"x")
    _old(p / "models" / ".model.ab12.tmp")
    (p / "data" / ".frames.cd34.tmp").mkdir()
    _old(p / "data" / ".frames.cd34.tmp")
    (p / "data" / "src" / ".videos.csv.ef56.tmp.csv").write_text("half")
    _old(p / "data" / "src" / ".videos.csv.ef56.tmp.csv")
    (p / "registry").mkdir()
    (p / "registry" / ".tmp-0f0f").mkdir()
    _old(p / "registry" / ".tmp-0f0f")
    (p / "models" / ".train.fresh.tmp").mkdir()                    # a stage writing right now
    (p / "models" / ".train.fresh.tmp" / "epoch1.pt").write_bytes(b"y")
    (p / "models" / "model.tmp").mkdir()                           # not a temp name: never touched
    os.symlink(p / "models" / "model.tmp", p / "data" / ".link.aa.tmp")   # a link: never followed or removed
    return p


OLD = ["models/.model.ab12.tmp", "data/.frames.cd34.tmp", "data/src/.videos.csv.ef56.tmp.csv", "registry/.tmp-0f0f"]


def test_removes_old_temps_keeps_recent_ones_and_other_files(project, capsys):
    assert cli(["clean-temp", "--params", "params.yaml"]) == 0
    out = capsys.readouterr().out
    assert not any((project / rel).exists() for rel in OLD), out
    assert (project / "models" / ".train.fresh.tmp" / "epoch1.pt").is_file()
    assert "kept models/.train.fresh.tmp" in out and "4 removed, 1 kept" in out
    assert (project / "models" / "model.tmp").is_dir() and (project / "data" / ".link.aa.tmp").is_symlink()
    assert (project / "data" / "src" / "videos.csv").is_file()
    assert cli(["clean-temp", "--min-age", "0", "--params", "params.yaml"]) == 0
    assert not (project / "models" / ".train.fresh.tmp").exists()
    assert cli(["clean-temp", "--min-age", "-1", "--params", "params.yaml"]) == 2


def test_refuses_while_a_nightly_run_or_gate_holds_the_lock(project, capsys):
    with run_lock(project / ".nightly.lock"):
        assert cli(["clean-temp", "--params", "params.yaml"]) == 2
        assert cli(["gate", "--params", "params.yaml"]) == 2          # gate waits for no one either
    err = capsys.readouterr().err
    assert err.count("another run holds") == 2 and "nightly)" in err
    assert all((project / rel).exists() for rel in OLD)


def test_refuses_while_dvc_runs_a_stage_or_holds_its_lock(project, capsys):
    tmp = project / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_text(json.dumps({"write": {"models": {"pid": os.getpid(), "cmd": "dvc repro train"}}}))
    assert cli(["clean-temp", "--params", "params.yaml"]) == 2
    assert "dvc is running a stage writing ['models (pid" in capsys.readouterr().err
    held = zc.lockfile.LockFile(str(tmp / "lock"))
    try:
        assert cli(["clean-temp", "--params", "params.yaml"]) == 2
    finally:
        held.close()
    assert "a dvc command holds the repo lock" in capsys.readouterr().err
    assert all((project / rel).exists() for rel in OLD)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp / "rwlock").write_text(json.dumps({"write": {"models": {"pid": dead.pid, "cmd": "dvc repro"}}}))
    assert cli(["clean-temp", "--params", "params.yaml"]) == 0         # the writer is gone: a killed repro
    assert not any((project / rel).exists() for rel in OLD)
    zc.lockfile.LockFile(str(tmp / "lock")).close()                     # the lock was released after the clean
