"""Versioned models in MLflow's model registry on a local SQLite file, with a ``champion`` alias.

Layout under ``registry.path`` (default ``registry/``, not in git or DVC)::

    mlflow.db                     MLflow tracking + model registry store (SQLite)
    artifacts/<uuid>/             one version's files: model/, threshold.json, metrics.json, version.json
    .tmp-<uuid>/                  a copy in progress (a killed run leaves it; clean_stale removes it)

A version's files are copied completely into ``.tmp-<uuid>`` and renamed into ``artifacts/`` before
the MLflow version that points at them exists; the champion is MLflow's ``champion`` alias, switched
in one SQLite transaction, so a reader sees the old champion or the new one, never half of one.
Status (candidate / champion / rejected / archived), reasons, metrics and provenance are version tags.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from defectflow.errors import DefectflowError
from defectflow.stage import logger

log = logger("registry")
MODEL_NAME = "defectflow"
CHAMPION = "champion"
STATUSES = ("candidate", "champion", "rejected", "archived")
DB_FILE = "mlflow.db"


class RegistryError(DefectflowError):
    """The registry is missing a version, or a version's files are incomplete."""


@dataclass
class ModelVersion:
    version: int
    status: str
    path: Path                      # the version's folder: model/, threshold.json, metrics.json
    created: str = ""
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    is_champion: bool = False

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def threshold_file(self) -> Path:
        return self.path / "threshold.json"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # mlflow reads DO_NOT_TRACK only as "true"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Registry:
    """The model registry of one project (``root`` = ``params.registry.path``)."""

    def __init__(self, root: Path | str, keep: int = 10):
        self.root = Path(root).resolve()
        self.keep = keep
        self._client = None

    @property
    def exists(self) -> bool:
        return (self.root / DB_FILE).is_file()

    @property
    def client(self):
        if self._client is None:
            _quiet_mlflow()
            from mlflow import MlflowClient

            self.root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{self.root / DB_FILE}"
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            from mlflow.exceptions import MlflowException
            try:
                self._client.get_registered_model(MODEL_NAME)
            except MlflowException:
                self._client.create_registered_model(MODEL_NAME, description="defectflow defect detector")
        return self._client

    # -- reading -------------------------------------------------------------------------------
    def _info(self, mv, champion: int | None) -> ModelVersion:
        tags = mv.tags or {}
        return ModelVersion(
            version=int(mv.version), status=tags.get("status", "candidate"), path=Path(mv.source),
            created=tags.get("created", ""), metrics=json.loads(tags.get("metrics", "{}")),
            provenance=json.loads(tags.get("provenance", "{}")), reasons=json.loads(tags.get("reasons", "[]")),
            is_champion=int(mv.version) == champion)

    def champion_version(self) -> int | None:
        from mlflow.exceptions import MlflowException
        try:
            return int(self.client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
        except MlflowException:
            return None

    def list(self) -> list[ModelVersion]:
        champ = self.champion_version()
        versions = self.client.search_model_versions(f"name='{MODEL_NAME}'")
        return sorted((self._info(mv, champ) for mv in versions), key=lambda v: v.version)

    def get(self, version: int) -> ModelVersion:
        from mlflow.exceptions import MlflowException
        try:
            mv = self.client.get_model_version(MODEL_NAME, str(int(version)))
        except MlflowException:
            raise RegistryError(f"{self.root}: no model version {version} "
                                f"(have: {[v.version for v in self.list()]})") from None
        return self._info(mv, self.champion_version())

    def champion(self) -> ModelVersion | None:
        v = self.champion_version()
        return None if v is None else self.get(v)

    # -- writing -------------------------------------------------------------------------------
    def register(self, model_dir: Path, threshold_file: Path, metrics: dict, provenance: dict,
                 created: str) -> ModelVersion:
        """Copy the model into the registry and add it as a ``candidate`` version."""
        model_dir, threshold_file = Path(model_dir), Path(threshold_file)
        for p in (model_dir, threshold_file):
            if not p.exists():
                raise RegistryError(f"{p}: not found; nothing to register (has the train stage run?)")
        key = uuid.uuid4().hex
        tmp = self.root / f".tmp-{key}"
        final = self.root / "artifacts" / key
        tmp.mkdir(parents=True)
        shutil.copytree(model_dir, tmp / "model")
        shutil.copy2(threshold_file, tmp / "threshold.json")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "version.json").write_text(json.dumps({"provenance": provenance, "created": created}, indent=1))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        tags = {"status": "candidate", "created": created, "metrics": json.dumps(metrics),
                "provenance": json.dumps(provenance), "reasons": "[]"}
        mv = self.client.create_model_version(MODEL_NAME, source=str(final), tags=tags)
        log.info("registry: version %s registered from %s (%s)", mv.version, model_dir, final)
        return self.get(int(mv.version))

    def _set(self, version: int, **tags) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(MODEL_NAME, str(version), key,
                                              value if isinstance(value, str) else json.dumps(value))

    def set_metrics(self, version: int, metrics: dict) -> None:
        self._set(version, metrics=metrics)

    def promote(self, version: int, reasons: list[str]) -> ModelVersion:
        """Make ``version`` the champion (the alias switch is atomic); the old champion is archived."""
        target = self.get(version)
        if not (target.model_dir.is_dir() and target.threshold_file.is_file()):
            raise RegistryError(f"{target.path}: version {version}'s files are incomplete; not promoted")
        old = self.champion_version()
        self.client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))
        self._set(version, status="champion", reasons=reasons)
        if old is not None and old != version:
            self._set(old, status="archived")
        log.info("registry: champion %s -> %s (%s)", old, version, "; ".join(reasons))
        return self.get(version)

    def reject(self, version: int, reasons: list[str]) -> ModelVersion:
        self._set(version, status="rejected", reasons=reasons)
        log.info("registry: version %s rejected (%s)", version, "; ".join(reasons))
        return self.get(version)

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep`` versions; the champion is always kept."""
        versions = self.list()
        newest = {v.version for v in versions[-self.keep:]}
        gone = []
        for v in versions:
            if v.version in newest or v.is_champion:
                continue
            self.client.delete_model_version(MODEL_NAME, str(v.version))
            if v.path.parent == self.root / "artifacts":
                shutil.rmtree(v.path, ignore_errors=True)
            gone.append(v.version)
        if gone:
            log.info("registry: pruned versions %s (registry.keep: %d)", gone, self.keep)
        return gone

    def clean_stale(self, min_age_s: float = 0.0) -> tuple[list[Path], list[Path]]:
        """(removed, kept): copies a killed run left (``.tmp-*`` folders, artifact folders no version
        points at); those changed in the last ``min_age_s`` are kept."""
        from defectflow.cleanup import age_s

        stale = sorted(self.root.glob(".tmp-*")) if self.root.is_dir() else []
        if self.exists and (self.root / "artifacts").is_dir():
            used = {v.path for v in self.list()}
            stale += [p for p in sorted((self.root / "artifacts").iterdir()) if p not in used]
        kept = [p for p in stale if min_age_s > 0 and age_s(p) < min_age_s]
        removed = [p for p in stale if p not in kept]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        if removed:
            log.info("registry: removed %d stale folder(s) left by an interrupted run: %s",
                     len(removed), [p.name for p in removed])
        return removed, kept


def champion_paths(root: Path | str) -> tuple[Path, Path, int] | None:
    """(model dir, threshold file, version) of the champion, or None when the registry has none."""
    reg = Registry(root)
    if not reg.exists:
        return None
    champ = reg.champion()
    return None if champ is None else (champ.model_dir, champ.threshold_file, champ.version)


def champion_or_default(params, model_dir: Path, threshold_file: Path, log) -> tuple[Path, Path]:
    """The champion's model folder and threshold file; ``models/`` with a warning when there is none."""
    found = champion_paths(params.registry.path)
    if found is None:
        log.warning("no champion in %s: using %s and %s (run the nightly gate or `defectflow gate`)",
                    params.registry.path, model_dir, threshold_file)
        return model_dir, threshold_file
    log.info("using the champion, version %d (%s)", found[2], found[0])
    return found[0], found[1]
