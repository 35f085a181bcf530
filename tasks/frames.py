"""Prefect task for the frames stage (the work is in defectflow.frames)."""
from defectflow import frames
from tasks.common import stage_task

frames_task = stage_task("frames", frames.run, progress=True)
