"""Prefect task for the evaluate stage (the work is in defectflow.evaluate)."""
from defectflow import evaluate
from tasks.common import stage_task

evaluate_task = stage_task("evaluate", evaluate.run)
