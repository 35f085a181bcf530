"""Where each stage reads and writes, relative to the project root (mirrored in dvc.yaml)."""
from pathlib import Path

DATA = Path("data")
MODELS = Path("models")
REPORTS = Path("reports")

STAGE_DIRS = {
    "frames": DATA / "frames",
    "detect": DATA / "detect",
    "masks": DATA / "masks",
    "roi": DATA / "roi",
    "augment": DATA / "augment",
    "synth": DATA / "synth",
    "train": MODELS / "model",
}
THRESHOLD_FILE = MODELS / "threshold.json"
VAL_SCORES_FILE = MODELS / "val_scores.parquet"
EVALUATE_DIR = REPORTS
HISTORY_FILE = DATA / "history" / "runs.jsonl"   # evaluate.history default: the report's trend
