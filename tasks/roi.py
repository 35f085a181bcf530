"""Prefect task for the roi stage (the work is in defectflow.roi)."""
from defectflow import roi
from tasks.common import stage_task

roi_task = stage_task("roi", roi.run)
