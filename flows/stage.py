"""Run one pipeline stage as a Prefect flow: ``python -m flows.stage NAME [--params params.yaml]``.

``dvc.yaml`` calls this for every stage, so each stage run shows up in the Prefect UI
with its logs. Paths come from ``defectflow.layout`` (mirrored in dvc.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from flows.server import quiet_environment

quiet_environment()

from prefect import flow  # noqa: E402

from defectflow import layout  # noqa: E402
from defectflow.config import load_params  # noqa: E402
from defectflow.errors import DefectflowError  # noqa: E402
from tasks.units import mapper_for, task_runner  # noqa: E402

D = {k: str(v) for k, v in layout.STAGE_DIRS.items()}

STAGE_ARGS = {
    "frames": lambda p: [p.source.path, D["frames"]],
    "detect": lambda p: [D["frames"], D["detect"]],
    "masks": lambda p: [D["detect"], D["masks"]],
    "roi": lambda p: [D["masks"], D["roi"]],
    "augment": lambda p: [D["roi"], D["augment"]],
    "synth": lambda p: [D["augment"], D["synth"]],
    "train": lambda p: [D["synth"], D["train"]],
    "threshold": lambda p: [D["synth"], D["train"], str(layout.THRESHOLD_FILE), str(layout.VAL_SCORES_FILE)],
    "evaluate": lambda p: [D["synth"], D["train"], str(layout.THRESHOLD_FILE), str(layout.EVALUATE_DIR)],
}
STAGES = tuple(STAGE_ARGS)


UNIT_STAGES = ("frames", "detect", "masks", "roi")   # their units go through the flow's task runner


def stage_task(name: str):
    return getattr(importlib.import_module(f"tasks.{name}"), f"{name}_task")


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage_flow(name: str, params_path: str = "params.yaml") -> dict:
    """One stage of the defectflow DAG, with the paths of defectflow.layout."""
    params = load_params(params_path)
    if name in UNIT_STAGES:
        run = importlib.import_module(f"defectflow.{name}").run
        return asdict(run(params, *(Path(p) for p in STAGE_ARGS[name](params)), mapper=mapper_for(params.scale)))
    return stage_task(name)(params_path, *STAGE_ARGS[name](params))


def run_stage(name: str, params_path: str = "params.yaml", address: str | None = None) -> dict:
    """``stage_flow`` on the task runner ``scale`` names (threads, or Dask; ``address``: a running scheduler)."""
    sp = load_params(params_path).scale
    runner = task_runner(sp.model_copy(update={"address": address}) if address else sp)
    return stage_flow.with_options(task_runner=runner)(name, params_path)


@contextlib.contextmanager
def shared_cluster(params_path: str, n_stages: int) -> Iterator[str | None]:
    """For several stages on a Dask LocalCluster: one cluster for all (workers start once); else None."""
    sp = load_params(params_path).scale
    if sp.runner != "dask" or sp.address or n_stages < 2:
        yield None
        return
    from distributed import LocalCluster
    with LocalCluster(n_workers=sp.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=STAGES, nargs="+", help="one stage (dvc.yaml), or several in order")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    name = args.name[0]
    try:
        load_params(args.params)  # a bad params.yaml stops here, before Prefect starts
        with shared_cluster(args.params, len(args.name)) as address:
            for name in args.name:
                run_stage(name, args.params, address)
    except DefectflowError as err:
        print(f"error in stage {name}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
