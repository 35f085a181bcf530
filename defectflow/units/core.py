"""Units, their results, and the map that runs them (with the cache and the unit error policy).

A stage cuts its input into ``Unit`` s, maps ``run_unit(params, unit, out) -> UnitResult`` over
them through a ``mapper`` (default: a serial map; ``tasks/units.py`` maps through a Prefect task
runner: threads or Dask) and merges the rows in a fixed order, so the manifest is the same
whatever the runner. ``map_units`` wraps each unit: a cache hit links the cached files into the
stage's output; a miss computes the unit into a staging folder, stores it and links it in.
A unit that raises fails alone (``scale.on_unit_error: quarantine``) or stops the stage
(``stop``: the error, named after the unit, is raised).
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import pandas as pd
from tqdm import tqdm

from defectflow.config import Params
from defectflow.stage import StageOutput, StageReport, logger
from defectflow.units.cache import FILES, UnitCache, link_tree, unit_key, units_root

POS = "_pos"     # a row's position in the stage's input manifest (merge order)
LOCAL = "_unit_row"   # inside a unit: the row's index in the unit


@dataclass(frozen=True)
class Unit:
    """One independent piece of a stage's work: ``payload`` (picklable) and the files it reads."""

    name: str
    payload: Any
    inputs: tuple[str, ...] = ()


@dataclass
class UnitResult:
    rows: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


@dataclass
class UnitOutcome:
    """What ``map_units`` gives back per unit: the result, or the failure (quarantine)."""

    name: str
    result: UnitResult | None
    hit: bool = False
    error: str | None = None
    seconds: float = 0.0


class Mapper(Protocol):
    def __call__(self, fn: Callable[[Unit], UnitOutcome], units: list[Unit]) -> list[UnitOutcome]: ...


def serial_map(fn: Callable[[Unit], UnitOutcome], units: list[Unit]) -> list[UnitOutcome]:
    """The default mapper: one unit after the other, in order."""
    return [fn(u) for u in tqdm(units, desc="units", unit="unit", disable=None, leave=False)]


def _localise(unit: Unit) -> tuple[Unit, list[int] | None]:
    """Rows carry their index in the unit instead of the input position (keys stay put when rows are added)."""
    p = unit.payload
    if not (isinstance(p, list) and p and isinstance(p[0], dict) and POS in p[0]):
        return unit, None
    rows = [{**{k: v for k, v in r.items() if k != POS}, LOCAL: i} for i, r in enumerate(p)]
    return Unit(unit.name, rows, unit.inputs), [r[POS] for r in p]


def _place(result: UnitResult, positions: list[int] | None) -> UnitResult:
    if positions is None:
        return result
    rows = [{**{k: v for k, v in r.items() if k != LOCAL}, POS: positions[r[LOCAL]]} for r in result.rows]
    return UnitResult(rows, result.stats)


def _compute(stage: str, run_unit: Callable, params: Params, settings: dict, final: str, tmp: str,
             cache_root: str | None, unit: Unit) -> tuple[UnitResult, bool]:
    cache = UnitCache(Path(cache_root), stage) if cache_root else None
    key = unit_key(stage, settings, final, unit.name, unit.payload, unit.inputs) if cache else None
    if cache and (hit := cache.load(key)) is not None:
        link_tree(cache.files_of(key), Path(tmp))
        return hit, True
    staging = cache.staging() if cache else Path(tempfile.mkdtemp(prefix=".unit-", dir=tmp))
    try:
        files = staging / FILES if cache else staging
        result = run_unit(params, unit, StageOutput(Path(final), files))
        if cache:
            staging = cache.store(key, staging, result)
            files = staging / FILES
        link_tree(files, Path(tmp))
    finally:
        if not cache or staging.name.startswith(".tmp-"):
            shutil.rmtree(staging, ignore_errors=True)
    return result, False


def _run_one(stage: str, run_unit: Callable, params: Params, settings: dict, final: str, tmp: str,
             cache_root: str | None, unit: Unit) -> UnitOutcome:
    """One unit, through the cache; module level so a Dask worker can unpickle it."""
    t0 = time.perf_counter()
    local, positions = _localise(unit)
    try:
        result, hit = _compute(stage, run_unit, params, settings, final, tmp, cache_root, local)
    except Exception as err:  # noqa: BLE001 - the policy decides; stop re-raises the same error
        where = f"{stage} unit {unit.name}"
        if params.scale.on_unit_error == "stop":
            err.add_note(f"in {where} (scale.on_unit_error: stop)")
            raise
        logger(stage).error("%s failed, quarantined: %s", where, err)
        return UnitOutcome(unit.name, None, error=traceback_text(err), seconds=time.perf_counter() - t0)
    return UnitOutcome(unit.name, _place(result, positions), hit=hit, seconds=time.perf_counter() - t0)


def map_units(stage: str, params: Params, units: list[Unit], run_unit: Callable, out: StageOutput,
              settings: dict, report: StageReport, mapper: Mapper | None = None) -> list[UnitOutcome]:
    """Run every unit (cached when ``scale.unit_cache``), in input order; quarantine.json for failures."""
    cache_root = str(units_root()) if params.scale.unit_cache else None
    fn = functools.partial(_run_one, stage, run_unit, params, settings, out.final.as_posix(), str(out.tmp),
                           cache_root)
    outcomes = list((mapper or serial_map)(fn, units))
    hits = sum(o.hit for o in outcomes)
    failed = [{"unit": o.name, "error": o.error} for o in outcomes if o.error]
    report.notes.append(f"{len(units)} unit(s): {hits} from the unit cache, {len(units) - hits - len(failed)} "
                        f"computed, {len(failed)} quarantined" + ("" if cache_root else " (scale.unit_cache off)"))
    if failed:
        tmp, _ = out.path("quarantine.json")
        tmp.write_text(json.dumps(failed, indent=1))
        report.notes.append("quarantined: " + "; ".join(f"{f['unit']}: {f['error']}" for f in failed))
    return outcomes


def results(outcomes: Iterable[UnitOutcome]) -> list[UnitResult]:
    return [o.result for o in outcomes if o.result is not None]


def merge_rows(outcomes: Iterable[UnitOutcome]) -> list[dict]:
    """Every unit's rows in input-manifest order (``_pos``), the position column dropped."""
    rows = [r for res in results(outcomes) for r in res.rows]
    if rows and POS in rows[0]:
        rows.sort(key=lambda r: r[POS])
    return [{k: v for k, v in r.items() if k != POS} for r in rows]


def quarantine_meta(outcomes: Iterable[UnitOutcome]) -> dict:
    """Manifest meta naming the failed units (empty when none failed)."""
    failed = [o.name for o in outcomes if o.error]
    return {"quarantined_units": json.dumps(failed)} if failed else {}


def group_units(stage: str, df: pd.DataFrame, inputs: Callable[[list[dict]], list[str]],
                chunk: int | None = None, by: tuple[str, ...] = ("run", "camera")) -> list[Unit]:
    """One unit per ``by`` group of ``df`` (in order of first appearance), cut into ``chunk`` rows if given.

    Each row carries its position in ``df`` (``_pos``) so the merge restores the input order.
    """
    records = df.to_dict("records")
    for i, r in enumerate(records):
        r[POS] = i
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[c] for c in by), []).append(r)
    units = []
    for key, rows in groups.items():
        name = "_".join(str(k) for k in key)
        parts = [rows] if not chunk else [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
        for j, part in enumerate(parts):
            uname = name if len(parts) == 1 else f"{name}#{j}"
            units.append(Unit(f"{uname}", part, tuple(sorted(set(inputs(part))))))
    return units


def traceback_text(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()
