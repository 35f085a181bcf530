"""Prefect task for the masks stage (the work is in defectflow.masks)."""
from defectflow import masks
from tasks.common import stage_task

masks_task = stage_task("masks", masks.run)
