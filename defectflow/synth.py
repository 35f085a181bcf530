"""Stage synth (AUGMENT -> SYNTH): synthetic good images from a StyleGAN2-ADA generator.

The generator arrives with a later issue. Until then the stage forwards every
row (``synthetic`` = False) when ``synth.enabled`` is false, and refuses to run
when it is true rather than pretend to generate anything.
"""
from __future__ import annotations

from pathlib import Path

from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.manifest import AUGMENT, SYNTH, read_manifest
from defectflow.stage import skip_stage
from defectflow.stage import StageReport, manifest_path


class GeneratorUnavailable(DefectflowError):
    """synth.enabled is true but no generator is available yet."""


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Forward ``inp``'s rows marked non-synthetic; error if generation is asked for."""
    if params.synth.enabled:
        raise GeneratorUnavailable(
            "synth.enabled=true: the StyleGAN2-ADA generator is not available yet (it arrives with a "
            "later issue); set synth.enabled: false in params.yaml")
    df = read_manifest(manifest_path(inp), AUGMENT)
    df = df.assign(synthetic=False)
    return skip_stage("synth", df, SYNTH, inp, out_dir, "synth disabled (synth.enabled=false)")
