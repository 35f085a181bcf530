"""A scratch copy of the project (code, dvc.yaml, params.yaml with overrides) for experiments,
benchmarks and end-to-end tests, so the real workspace and its DVC state stay untouched."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from defectflow.config import params_from_dict, set_key

ROOT = Path(__file__).resolve().parents[1]
CODE = ("defectflow", "tasks", "flows")


def copy_project(dst: Path | str, overrides: dict | None = None, root: Path = ROOT) -> Path:
    """Copy the project's code and config to ``dst``, applying dotted-key param overrides."""
    dst = Path(dst)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CODE:
        shutil.copytree(root / name, dst / name, ignore=ignore, dirs_exist_ok=True)
    shutil.copy(root / "dvc.yaml", dst / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in (overrides or {}).items():
        set_key(params, key, value)
    params_from_dict(params, f"{dst}/params.yaml")  # fail early on a bad override
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst
