"""Run one pipeline stage as a Prefect flow: ``python -m flows.stage NAME [--params params.yaml]``.

``dvc.yaml`` calls this for every stage, so each stage run shows up in the Prefect UI
with its logs. Paths come from ``defectflow.layout`` (mirrored in dvc.yaml).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from flows.server import quiet_environment

quiet_environment()

from prefect import flow  # noqa: E402

from defectflow import layout  # noqa: E402
from defectflow.config import load_params  # noqa: E402
from defectflow.errors import DefectflowError  # noqa: E402

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


def stage_task(name: str):
    return getattr(importlib.import_module(f"tasks.{name}"), f"{name}_task")


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage_flow(name: str, params_path: str = "params.yaml") -> dict:
    """One stage of the defectflow DAG, with the paths of defectflow.layout."""
    params = load_params(params_path)
    return stage_task(name)(params_path, *STAGE_ARGS[name](params))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=STAGES)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        load_params(args.params)  # a bad params.yaml stops here, before Prefect starts
        stage_flow(args.name, args.params)
    except DefectflowError as err:
        print(f"error in stage {args.name}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
