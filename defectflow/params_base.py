"""The base of every params section: strict (unknown keys refused), frozen; and the params error."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from defectflow.errors import DefectflowError


class ParamsError(DefectflowError):
    """params.yaml is missing, unreadable or invalid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
