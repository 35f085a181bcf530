"""Prefect task for the detect stage (the work is in defectflow.detect)."""
from defectflow import detect
from tasks.common import stage_task

detect_task = stage_task("detect", detect.run)
