"""Params sections of operations (``params.yaml``: nightly, ingest, registry, gate, scale); assembled into
:class:`defectflow.config.Params`."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from defectflow.params_base import Strict as _Strict


class NightlyParams(_Strict):
    cron: str = Field("0 2 * * *", description="when the nightly retrain runs (cron, server time zone)")
    timezone: str = "UTC"
    lock: str = Field(".nightly.lock", description="run lock file: a second nightly run exits at once")
    work_pool: str = Field("defectflow", description="Prefect work pool of the nightly deployment (prefect.yaml)")

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError("cron must have 5 fields (minute hour day month weekday)")
        return cron


class IngestParams(_Strict):
    inbox: str = Field("data/inbox", description="new good videos / images land here")
    quarantine: str = Field("data/quarantine", description="rejected files + a .reason.txt each")
    min_side: int = Field(32, ge=1, description="smallest accepted frame / image side, pixels")
    max_side: int = Field(8192, ge=1)
    channels: tuple[int, ...] = Field((3,), min_length=1, description="accepted colour channels")
    min_duration_s: float = Field(0.5, ge=0.0, description="videos: shortest accepted clip")
    max_duration_s: float = Field(3600.0, gt=0.0)


class RegistryParams(_Strict):
    path: str = Field("registry", description="MLflow model registry (SQLite) + version files")
    keep: int = Field(10, ge=1, description="versions kept (the champion always is)")


class GateParams(_Strict):
    max_auroc_drop: float = Field(0.02, ge=-1.0, le=1.0, description="challenger may lose this much image AUROC")
    max_far_increase: float = Field(0.02, ge=-1.0, le=1.0, description="... and gain this much false-alarm rate")


class ScaleParams(_Strict):
    runner: Literal["threads", "dask"] = Field("threads", description=(
        "Prefect task runner the per-item stages map their units through: threads (one machine) or dask"))
    workers: int = Field(2, ge=1, le=4096, description="threads, or Dask workers of a LocalCluster (address null)")
    address: Optional[str] = Field(None, description="runner dask: scheduler address (tcp://host:8786); null = LocalCluster")
    on_unit_error: Literal["stop", "quarantine"] = Field("stop", description=(
        "a unit that fails on bad data: stop the stage (naming it), or list it in quarantine.json and go on"))
    unit_cache: bool = Field(False, description=(
        "keep each unit's result keyed by its inputs' content + params + code (params.yaml turns it on)"))
    unit_images: int = Field(256, ge=1, le=1_000_000, description="per-image stages (roi, masks crop): rows per unit")
    score_chunk: int = Field(8, ge=1, le=100_000, description="score flow: videos (or image units) per streamed chunk")
    retries: int = Field(2, ge=0, le=20, description="Prefect retries of a unit (worker lost, I/O error)")
