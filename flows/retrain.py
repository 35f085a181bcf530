"""The whole DAG: ``dvc repro`` inside a Prefect flow (each stage then runs as its own flow).

    python -m flows.server -- python -m flows.retrain [--force]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from flows.server import quiet_environment

quiet_environment()

from prefect import flow, get_run_logger, task  # noqa: E402

from defectflow import layout  # noqa: E402
from defectflow.procs import popen_tied  # noqa: E402


@task(name="dvc-repro", retries=1, retry_delay_seconds=10)
def dvc_repro(force: bool = False, pull: bool = False) -> str:
    """Run ``dvc repro`` and stream its output into the Prefect log."""
    log = get_run_logger()
    cmd = ["dvc", "repro"] + (["--force"] if force else []) + (["--pull"] if pull else [])
    proc = popen_tied(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # dies with this process
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        log.info(line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro failed (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain(force: bool = False) -> dict:
    """Rerun what changed in the DAG (all of it with ``force``); return the test metrics."""
    dvc_repro(force=force)
    metrics_file = layout.REPORTS / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    get_run_logger().info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="rerun every stage")
    args = ap.parse_args(argv)
    retrain(force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
