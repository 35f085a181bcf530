"""Shared shape of the stage tasks: load params, call the library stage, return its report."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from prefect import task

from defectflow.config import Params, load_params, params_from_dict


def transient_io(task, task_run, state) -> bool:
    """Retry only on OS-level I/O errors (a network share hiccup); bad data never heals."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError))


def resolve_params(params: str | dict) -> Params:
    """A params.yaml path, or a dict of params (flows that override a few values)."""
    return params_from_dict(params, "params (dict)") if isinstance(params, dict) else load_params(params)


def stage_task(name: str, run: Callable, retries: int = 2, progress: bool = False,
               after: Callable | None = None):
    """Wrap ``run(params, *paths)`` of a library stage as a Prefect task named ``name``; ``progress``
    publishes a progress artifact, ``after(params, *paths)`` runs once the stage succeeded."""

    @task(name=name, retries=retries, retry_delay_seconds=5, retry_condition_fn=transient_io)
    def _stage(params: str | dict, *paths: str) -> dict:
        p = resolve_params(params)
        if progress:
            from tasks.artifacts import progress_artifact
            with progress_artifact(name, p.evaluate.line):
                report = run(p, *(Path(x) for x in paths))
        else:
            report = run(p, *(Path(x) for x in paths))
        if after is not None:
            after(p, *paths)
        return asdict(report)

    _stage.__doc__ = f"Run the {name} stage (defectflow.{name}.run)."
    return _stage
