"""What QA asks first: products inspected, passed, flagged and sent to review, per run and camera,
and the defect rate of this run against the previous ones (``data/history/runs.jsonl``).

Disposition of a product (its highest camera score ``max_score``):
``flagged`` = verdict defect (some camera at or over the threshold); ``review`` = passed, but its
score is in the operator bands' review range (>= ``bands.low``); ``passed`` = the rest.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pandas as pd

from defectflow.errors import DefectflowError

DISPOSITIONS = ("passed", "review", "flagged")


class HistoryError(DefectflowError):
    """The run history file is unreadable."""


def dispositions(verdicts: pd.DataFrame, review_low: float | None) -> pd.Series:
    """``passed`` / ``review`` / ``flagged`` per verdict row (see the module docstring)."""
    flagged = verdicts["verdict"] == "defect"
    review = ~flagged & (verdicts["max_score"] >= review_low) if review_low is not None else flagged & False
    out = pd.Series("passed", index=verdicts.index, dtype=object)
    out[review] = "review"
    out[flagged] = "flagged"
    return out


def _counts(d: pd.Series) -> dict:
    c = {k: int((d == k).sum()) for k in DISPOSITIONS}
    c["inspected"] = int(len(d))
    c["defect_rate"] = c["flagged"] / c["inspected"] if c["inspected"] else None
    return c


def qa_summary(verdicts: pd.DataFrame, scored: pd.DataFrame, threshold: float, review_low: float | None) -> dict:
    """Counts overall, per run and per camera (a camera's view is flagged when its score >= threshold,
    review when it is >= ``review_low``)."""
    disp = dispositions(verdicts, review_low)
    per_run = [{"run": str(run), **_counts(disp[g.index])} for run, g in verdicts.groupby("run", sort=True)]
    per_camera = []
    if len(scored):
        cam = scored.groupby(["camera", "product_id"])["score"].max().reset_index()
        for camera, g in cam.groupby("camera", sort=True):
            v = pd.Series("passed", index=g.index, dtype=object)
            if review_low is not None:
                v[g["score"] >= review_low] = "review"
            v[g["score"] >= threshold] = "flagged"
            per_camera.append({"camera": str(camera), **_counts(v)})
    return {"threshold": float(threshold), "review_low": review_low, **_counts(disp),
            "per_run": per_run, "per_camera": per_camera,
            "rule": "flagged: some camera's score >= threshold; review: passed but max score >= the review band's "
                    "low end" if review_low is not None else "flagged: some camera's score >= threshold"}


def read_history(path: Path) -> list[dict]:
    """Every recorded run (oldest first); [] when there is no history yet."""
    path = Path(path)
    if not path.is_file():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise HistoryError(f"{path}:{n}: not a JSON line ({err.msg}); fix or remove the line") from None
    return runs


def history_entry(kind: str, qa: dict, *, model_version: str | None, metrics: dict | None = None,
                  when: _dt.datetime | None = None) -> dict:
    """One line of the history: time, kind (evaluate | score), counts, defect rate, model, key metrics."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    m = metrics or {}
    return {"time": when.isoformat(timespec="seconds"), "kind": kind, "model_version": model_version,
            **{k: qa[k] for k in ("inspected", "passed", "review", "flagged", "defect_rate")},
            "image_auroc": m.get("image_auroc"), "product_accuracy": m.get("product_accuracy")}


def append_history(path: Path, entry: dict) -> list[dict]:
    """Append ``entry`` (after checking the file reads) and return the whole history."""
    runs = read_history(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return runs + [entry]
