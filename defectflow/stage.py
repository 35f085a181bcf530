"""What every stage shares: its output folder (written atomically) and its log lines.

A stage is a plain function ``run(params, inp, out_dir) -> StageReport`` in its own
module; it reads ``inp/manifest.parquet`` and writes ``out_dir/manifest.parquet``
plus its files. Files are written into a temp folder that replaces ``out_dir``
only when the stage succeeds, so a failed run leaves the last good output.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from defectflow.fsutil import atomic_dir
from defectflow.manifest import Schema, write_manifest

MANIFEST = "manifest.parquet"


@dataclass
class StageOutput:
    """Where a running stage writes: ``tmp`` now, ``final`` once it succeeds."""

    final: Path
    tmp: Path

    def path(self, rel: str) -> tuple[Path, str]:
        """Return (where to write now, the path to record in the manifest)."""
        tmp = self.tmp / rel
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp, (self.final / rel).as_posix()

    @property
    def manifest(self) -> Path:
        return self.tmp / MANIFEST


@dataclass
class StageReport:
    stage: str
    read: list[str] = field(default_factory=list)
    wrote: list[str] = field(default_factory=list)
    n_in: int = 0
    n_out: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    rss_mb: tuple[int, int] | None = None     # the process's memory when the stage ended: (now, peak so far)

    def summary(self) -> str:
        mem = f"; memory {self.rss_mb[0]} MB, peak {self.rss_mb[1]} MB" if self.rss_mb else ""
        return (f"{self.stage}: read {', '.join(self.read) or '-'} ({self.n_in} rows); "
                f"wrote {', '.join(self.wrote) or '-'} ({self.n_out} rows) in {self.seconds:.1f}s{mem}")


def process_memory_mb() -> tuple[int, int]:
    """This process's resident memory now and its peak so far, MB (Linux and macOS; now = peak elsewhere)."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 1024 / 1024
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        now = peak
    return round(now), round(peak)


def trim_memory() -> None:
    """Hand the allocator's free heap pages back to the system (glibc ``malloc_trim``, as Dask's workers do;
    nothing elsewhere): a long run that allocates and frees large arrays otherwise keeps its high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def logger(stage: str) -> logging.Logger:
    return logging.getLogger(f"defectflow.{stage}")


@contextlib.contextmanager
def stage_run(stage: str, out_dir: Path | str) -> Iterator[tuple[StageOutput, StageReport]]:
    """Open an atomic output folder for ``stage`` and time it; logs the summary on success."""
    out_dir = Path(out_dir)
    report = StageReport(stage)
    log = logger(stage)
    t0 = time.perf_counter()
    log.info("%s: started, output %s", stage, out_dir)
    with atomic_dir(out_dir) as tmp:
        yield StageOutput(out_dir, tmp), report
        if not report.wrote:
            report.wrote.append(str(out_dir / MANIFEST))
    report.seconds = time.perf_counter() - t0
    report.rss_mb = process_memory_mb()
    for note in report.notes:
        log.info("%s: %s", stage, note)
    log.info(report.summary())


def manifest_path(stage_dir: Path | str) -> Path:
    return Path(stage_dir) / MANIFEST


def skip_stage(stage: str, df: pd.DataFrame, schema: Schema, inp: Path, out_dir: Path,
               reason: str) -> StageReport:
    """Forward ``df`` unchanged into ``out_dir`` under ``schema``; say why in notes and meta."""
    with stage_run(stage, out_dir) as (out, report):
        write_manifest(df, schema, out.manifest, meta={"skipped": reason})
        report.read.append(str(inp))
        report.n_in = report.n_out = len(df)
        report.notes.append(f"skipped: {reason}; {len(df)} rows forwarded")
    return report
