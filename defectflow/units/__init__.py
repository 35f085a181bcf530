"""Work units of the per-item stages: a stage's work cut into units mapped independently.

A unit (one video, one camera's rows, a chunk of images) is computed by a pure function of
its input files' content and the stage's params, so it can be cached (``cache.py``) and run
anywhere (``core.py``'s ``mapper``: a serial map here, a Prefect task runner in ``tasks/units.py``).
"""
from defectflow.units.core import (Mapper, Unit, UnitOutcome, UnitResult, group_units, map_units, merge_rows,
                                   serial_map)

__all__ = ["Mapper", "Unit", "UnitOutcome", "UnitResult", "group_units", "map_units", "merge_rows", "serial_map"]
