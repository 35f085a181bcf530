"""Prefect task for the augment stage (the work is in defectflow.augment)."""
from defectflow import augment
from tasks.common import stage_task

augment_task = stage_task("augment", augment.run)
