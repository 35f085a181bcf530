"""Model card: which data, params, model and code produced the report."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


def file_hash(path: Path, n: int = 12) -> str | None:
    """Short sha256 of a file's bytes; None when it is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def dir_hash(folder: Path, n: int = 12) -> str | None:
    """Short sha256 over a folder's file names and bytes (the model version); None when absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update((file_hash(p, 64) or "").encode())
    return h.hexdigest()[:n]


def params_hash(params_dict: dict, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(params_dict, sort_keys=True, default=str).encode()).hexdigest()[:n]


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's short hash (``+dirty`` with uncommitted changes), ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_card(data_manifest: Path, model_dir: Path, params_dict: dict, threshold_info: dict | None) -> dict:
    """Rows of the model card (also stored in qa.json)."""
    t = params_dict.get("train", {})
    return {"data": str(data_manifest), "data_hash": file_hash(data_manifest),
            "params_hash": params_hash(params_dict), "model_version": dir_hash(model_dir),
            "git_commit": git_commit(), "backbone": t.get("backbone"), "head": t.get("head"),
            "score_from": t.get("score_from"), "image_size": t.get("image_size"),
            "threshold": (threshold_info or {}).get("threshold"),
            "threshold_method": (threshold_info or {}).get("method_used"),
            "target_fpr": (threshold_info or {}).get("target_fpr")}
