"""Prefect task for the synth stage (the work is in defectflow.synth)."""
from defectflow import synth
from tasks.common import stage_task

synth_task = stage_task("synth", synth.run)
