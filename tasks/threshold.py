"""Prefect task for the threshold stage (the work is in defectflow.threshold)."""
from defectflow import threshold
from tasks.common import stage_task

threshold_task = stage_task("threshold", threshold.run)
