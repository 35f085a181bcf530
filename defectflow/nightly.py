"""The nightly retrain, safe to run unattended: run lock -> clean what a killed run left -> ingest ->
good-set check -> ``dvc repro`` -> gate (register, compare with the champion, promote or reject).

No Prefect here: ``flows/nightly.py`` runs these steps as a Prefect flow, ``defectflow nightly``
without one. The champion changes only in the gate's last step (an atomic alias switch), so a run
that fails or is killed anywhere before leaves the champion as it was.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd

from defectflow.cleanup import clean_stale, dvc_idle
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.ingest import IngestReport, ingest
from defectflow.procs import popen_tied, stop_group
from defectflow.registry.gate import Decision, Scorer, eval_rows, pipeline_scorer, run_gate
from defectflow.stage import logger

log = logger("nightly")


class NightlyError(DefectflowError):
    """The nightly run stopped: nothing to train on, or a step failed; the champion is unchanged."""


class NightlyBusy(NightlyError):
    """Another nightly run holds the lock."""


@contextlib.contextmanager
def run_lock(path: Path | str, what: str = "nightly") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the run; raise NightlyBusy at once if another holds it.
    The kernel drops the lock when the holder dies, however it dies. ``what`` goes into the holder line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown holder"
            raise NightlyBusy(f"another run holds {path} since {holder}, exiting") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} (pid {os.getpid()}, {what})\n")
        fh.flush()
        yield path
    finally:
        fh.close()


def count_good_train(params: Params, project: Path | str = ".") -> int:
    """Good training samples in the source: videos.csv train rows (label good or unset) or train/good files."""
    data = Path(project) / params.source.path
    if params.source.kind == "images":
        folder = data / "train" / "good"
        return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    f = data / "videos.csv"
    if not f.is_file():
        return 0
    df = pd.read_csv(f, dtype=str, keep_default_na=False)
    label = df["label"] if "label" in df.columns else pd.Series("", index=df.index)
    return int(((df["split"] == "train") & label.isin(["good", ""])).sum())


def run_command(cmd: Sequence[str], cwd: Path | str = ".", on_line: Callable[[str], None] = log.info) -> None:
    """Run ``cmd`` (``dvc repro``), streaming its output; it dies with this process."""
    import subprocess

    proc = popen_tied(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            on_line(line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
        code = proc.wait()
    finally:
        stop_group(proc)
    if code != 0:
        raise NightlyError(f"{' '.join(cmd)} failed (exit {code}); champion unchanged. Last lines:\n" + "\n".join(tail))


@dataclass
class NightlyResult:
    ingest: IngestReport | None
    decision: Decision | None            # None: the model did not change, nothing was gated
    seconds: float


def run_nightly(params: Params, project: Path | str = ".", *, repro: Callable[[], None] | None = None,
                repro_cmd: Sequence[str] = ("dvc", "repro"), scorer: Scorer = pipeline_scorer,
                evaluation: Callable[[Path], pd.DataFrame] = eval_rows) -> NightlyResult:
    """Every step of the nightly retrain under the run lock; raises NightlyError (champion unchanged)."""
    t0 = time.monotonic()
    project = Path(project)
    with run_lock(project / params.nightly.lock) as lock:
        log.info("nightly: holding %s", lock)
        with dvc_idle(project):
            clean_stale(params, project)
        report = None
        if (project / params.ingest.inbox).is_dir():
            report = ingest(params, project=project)
            log.info("nightly: %s", report.summary())
        else:
            log.info("nightly: no inbox at %s, nothing to ingest", project / params.ingest.inbox)
        n_good = count_good_train(params, project)
        if n_good == 0:
            raise NightlyError(f"{project / params.source.path}: no good training samples (split train, label "
                               "good); not retraining, champion unchanged")
        log.info("nightly: %d good training source(s); retraining", n_good)
        t1 = time.monotonic()
        (repro or (lambda: run_command(repro_cmd, cwd=project)))()
        log.info("nightly: retrain took %.1fs", time.monotonic() - t1)
        decision = run_gate(params, project, scorer=scorer, evaluation=evaluation)
    log.info("nightly: done in %.1fs: %s", time.monotonic() - t0,
             "model unchanged, nothing gated" if decision is None else
             f"challenger v{decision.challenger['version']} {'promoted' if decision.promoted else 'rejected'}")
    return NightlyResult(report, decision, time.monotonic() - t0)
