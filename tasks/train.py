"""Prefect task for the train stage (the work is in defectflow.train)."""
from defectflow import train
from tasks.common import stage_task

train_task = stage_task("train", train.run, progress=True)
