"""Per-unit result cache: ``<cache>/units/<stage>/<key>/`` holds a unit's files and rows.

The key is a sha256 of the stage, the code (every ``defectflow`` source file), the stage's params
sections, the output folder, the unit's payload (its manifest rows) and the content of its input
files, so a hit is exactly what computing the unit again would give. Entries are written to a temp
folder and renamed into place; a hit hard-links (or copies, across file systems) the files into
the stage's output. ``result.pkl`` is a pickle: the cache is trusted local or shared project data.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path

from defectflow.onnx_backbone import cache_dir

RESULT = "result.pkl"
FILES = "files"
_CHUNK = 1 << 20


def units_root(path: str | os.PathLike | None = None) -> Path:
    """``$DEFECTFLOW_CACHE/units`` (default ``.cache/defectflow/units``)."""
    return cache_dir(path) / "units"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of every defectflow source file: any code change makes new keys."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1]
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content (FileNotFoundError names the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def unit_key(stage: str, settings: dict, out_final: str, name: str, payload, inputs: tuple[str, ...]) -> str:
    """The cache key of one unit (see module doc)."""
    h = hashlib.sha256()
    head = {"stage": stage, "code": code_version(), "settings": settings, "out": out_final, "unit": name}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    for path in sorted(set(inputs)):
        h.update(path.encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def link_tree(src: Path, dst: Path) -> int:
    """Hard-link (else copy) every file under ``src`` to the same place under ``dst``; files linked."""
    n = 0
    for root, _, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            s, d = Path(root) / name, target / name
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
            n += 1
    return n


class UnitCache:
    """The entries of one stage under ``root/<stage>``."""

    def __init__(self, root: Path, stage: str):
        self.dir = Path(root) / stage

    def load(self, key: str):
        """The cached result of ``key`` (files are under ``files_of(key)``), or None."""
        path = self.dir / key / RESULT
        if not path.is_file():
            return None
        try:
            return pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            return None                      # a damaged entry is recomputed, never trusted

    def files_of(self, key: str) -> Path:
        return self.dir / key / FILES

    def staging(self) -> Path:
        """A fresh folder to compute a unit into (its ``files`` subfolder is the unit's output)."""
        path = self.dir / f".tmp-{uuid.uuid4().hex}"
        (path / FILES).mkdir(parents=True)
        return path

    def store(self, key: str, staging: Path, result) -> Path:
        """Move ``staging`` into place as ``key``'s entry; returns the entry (another writer's if it won)."""
        (staging / RESULT).write_bytes(pickle.dumps(result))
        entry = self.dir / key
        try:
            os.rename(staging, entry)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (entry / RESULT).is_file():
                raise
        return entry
