"""A map of tiny units through Prefect on a 2-worker Dask LocalCluster whose first attempt at one unit
kills its worker (``os._exit``); run as a script by tests/test_scale_dask.py, prints the outcomes as JSON.

    python tests/dask_fakes.py OUT_DIR MARKER_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flows.server import quiet_environment

quiet_environment()

from prefect import flow  # noqa: E402

from defectflow.config import params_from_dict  # noqa: E402
from defectflow.stage import StageOutput, stage_run  # noqa: E402
from defectflow.units import Unit, UnitResult, map_units  # noqa: E402
from tasks.units import mapper_for, task_runner  # noqa: E402

VICTIM = "u2"


def square_or_die(params, unit: Unit, out: StageOutput) -> UnitResult:
    """Square the unit's number into a file; the first attempt at ``VICTIM`` kills its worker process."""
    marker = Path(unit.payload["markers"]) / unit.name
    if unit.name == VICTIM and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(3)
    tmp, recorded = out.path(f"{unit.name}.txt")
    tmp.write_text(str(unit.payload["x"] ** 2))
    return UnitResult([{"unit": unit.name, "square": unit.payload["x"] ** 2, "pid": os.getpid(), "file": recorded}])


@flow(name="dask-kill")
def kill_map(out_dir: str, markers: str, n: int) -> dict:
    params = params_from_dict({"scale": {"runner": "dask", "workers": 2, "retries": 0}}, "test params")
    units = [Unit(f"u{i}", {"x": i, "markers": markers}) for i in range(n)]
    with stage_run("dask-kill", Path(out_dir)) as (out, report):
        outcomes = map_units("dask-kill", params, units, square_or_die, out, {}, report,
                             mapper=mapper_for(params.scale))
    return {"rows": [r for o in outcomes for r in (o.result.rows if o.result else [])],
            "errors": [o.error for o in outcomes if o.error], "notes": report.notes}


def main(argv: list[str]) -> int:
    out_dir, markers = argv
    sp = params_from_dict({"scale": {"runner": "dask", "workers": 2}}, "test params").scale
    result = kill_map.with_options(task_runner=task_runner(sp))(out_dir, markers, 6)
    print("RESULT=" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
