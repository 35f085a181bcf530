"""Serve the retrain flow on the cron schedule of ``params.yaml`` (nightly.cron).

    python -m flows.server --serve &                 # UI + scheduler on :4200 (or use the plant's server)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.nightly                          # serves until stopped; runs show in the Prefect UI

Ingesting new good samples, gating a new model and the model registry come with a later issue.
"""
from __future__ import annotations

import argparse
import sys

from flows.server import quiet_environment

quiet_environment()

from prefect.schedules import Cron  # noqa: E402

from defectflow.config import Params, load_params  # noqa: E402
from flows.retrain import retrain  # noqa: E402


def schedule(params: Params) -> Cron:
    """The nightly schedule from params (validated: five cron fields)."""
    return Cron(params.nightly.cron, timezone=params.nightly.timezone)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    retrain.with_options(name="nightly").serve(
        name="nightly-retrain", schedule=schedule(load_params(args.params)), parameters={"force": False},
        description="Nightly retrain of defectflow on the good samples collected so far.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
