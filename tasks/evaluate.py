"""Prefect task for the evaluate stage (the work is in defectflow.evaluate); publishes the run's artifacts."""
import json
from pathlib import Path

from defectflow import evaluate
from tasks.common import stage_task


def publish_evaluate(params, *paths: str) -> list[str]:
    """The summary, metrics and flagged-products artifacts from the reports folder just written."""
    from tasks.artifacts import publish_run

    out = Path(paths[-1])
    qa = json.loads((out / "qa.json").read_text())
    return publish_run(qa, json.loads((out / "metrics.json").read_text()))


evaluate_task = stage_task("evaluate", evaluate.run, progress=True, after=publish_evaluate)
