"""The shared store of the README's scale-out section: a local folder as the DVC remote. One "machine"
reproduces a tiny stage and pushes its output; a fresh clone (another machine) pulls it back."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DVC = Path(sys.executable).parent / "dvc"
STAGE_CMD = "python -c \"import pathlib; p = pathlib.Path('out'); p.mkdir(); (p / 'a.txt').write_text('unit 7')\""


def _run(args, cwd, env, stderr: bool = True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr if stderr else proc.stdout


def dvc_env() -> dict:
    """The environment of a scratch git + DVC repo (skips the test without dvc or git)."""
    if not DVC.is_file() or not shutil.which("git"):
        pytest.skip("dvc or git missing")
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_an_output_pushed_to_a_folder_remote_is_pulled_by_a_fresh_clone(tmp_path):
    env = dvc_env()
    a, store = tmp_path / "machine_a", tmp_path / "store"
    a.mkdir()
    _run(["git", "init", "-q"], a, env)
    _run([str(DVC), "init", "-q"], a, env)
    _run([str(DVC), "stage", "add", "-q", "-n", "make", "-o", "out", STAGE_CMD], a, env)
    _run([str(DVC), "repro", "-q"], a, env)
    _run([str(DVC), "remote", "add", "-d", "store", str(store)], a, env)
    _run(["git", "add", "-A"], a, env)
    _run(["git", "commit", "-q", "-m", "stage + remote"], a, env)
    _run([str(DVC), "push", "-q"], a, env)
    assert any(p.is_file() for p in store.rglob("*"))           # the content is in the shared folder

    b = tmp_path / "machine_b"
    _run(["git", "clone", "-q", str(a), str(b)], tmp_path, env)
    assert not (b / "out").exists()                              # git carries dvc.lock, not the data
    _run([str(DVC), "pull", "-q"], b, env)
    assert (b / "out/a.txt").read_text() == "unit 7"
    status = _run([str(DVC), "status"], b, env)
    assert "up to date" in status.lower()                        # the pulled output matches dvc.lock
