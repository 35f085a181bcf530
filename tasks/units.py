"""Prefect side of the work units: map a stage's units through the flow's task runner.

``task_runner(params.scale)`` picks the runner (threads, or prefect-dask's ``DaskTaskRunner`` on
a ``LocalCluster`` or an existing scheduler); ``prefect_map`` is the ``mapper`` the library
stages take: one Prefect task run per unit, results back in unit order. A worker that dies
mid-map has its tasks rescheduled by Dask on another worker; an I/O error is retried by Prefect
(``scale.retries``); bad data is the unit's own business (``scale.on_unit_error``).
"""
from __future__ import annotations

import functools
from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from defectflow.config import ScaleParams
from defectflow.units import Unit, UnitOutcome
from tasks.common import transient_io


@task(name="unit", cache_policy=NO_CACHE, retry_delay_seconds=2, retry_condition_fn=transient_io)
def unit_task(fn: Callable[[Unit], UnitOutcome], unit: Unit) -> UnitOutcome:
    """One work unit of a stage (``defectflow.units.core._run_one`` bound to the stage)."""
    return fn(unit)


def prefect_map(fn: Callable[[Unit], UnitOutcome], units: list[Unit], retries: int = 2) -> list[UnitOutcome]:
    """Submit every unit to the running flow's task runner; wait for all, in order."""
    stage = getattr(fn, "args", ("units",))[0]
    futures = [unit_task.with_options(task_run_name=f"{stage}:{u.name}", retries=retries).submit(fn, u)
               for u in units]
    return [f.result() for f in futures]


def mapper_for(sp: ScaleParams) -> Callable:
    return functools.partial(prefect_map, retries=sp.retries)


def task_runner(sp: ScaleParams):
    """The task runner ``scale`` asks for: threads, a Dask LocalCluster, or a Dask scheduler."""
    if sp.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=sp.workers)
    from prefect_dask import DaskTaskRunner
    if sp.address:
        return DaskTaskRunner(address=sp.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": sp.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})
