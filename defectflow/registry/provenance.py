"""Where a model came from: params hash, data hash (dvc.lock), git commit."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from defectflow.config import Params


def params_hash(params: Params) -> str:
    """sha256 of the validated params (defaults filled in), so equal settings hash equal."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lock_entry(lock: dict, stage: str, key: str, path: str) -> str | None:
    for entry in (lock.get("stages", {}).get(stage, {}).get(key) or []):
        if entry.get("path") == path:
            return entry.get("md5") or entry.get("hash")
    return None


def dvc_hashes(project: Path | str = ".") -> dict:
    """The training data's and the model's hashes as ``dvc.lock`` records them (None without a lock)."""
    lock_file = Path(project) / "dvc.lock"
    if not lock_file.is_file():
        return {"data_hash": None}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {"data_hash": _lock_entry(lock, "train", "deps", "data/synth")}


def files_hash(*paths: Path) -> str:
    """sha256 over the files (names and bytes) of folders / files: the same model hashes the same."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(f.relative_to(root.parent).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def git_commit(project: Path | str = ".") -> str:
    """HEAD's commit (``+dirty`` with uncommitted changes to tracked files), or ``unknown``."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def provenance(params: Params, model_dir: Path, threshold_file: Path, project: Path | str = ".") -> dict:
    return {"params_hash": params_hash(params), **dvc_hashes(project),
            "model_hash": files_hash(model_dir, threshold_file), "git_commit": git_commit(project)}
