"""synth: forwarded and marked non-synthetic while disabled; a clear refusal while the generator is missing."""
from pathlib import Path

import numpy as np
import pytest
from vision_scene import write_images

from defectflow import synth
from defectflow.config import params_from_dict
from defectflow.manifest import AUGMENT, SYNTH, read_manifest, read_meta


def test_disabled_forwards_rows_as_real(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_images(Path("aug"), [np.zeros((8, 8, 3), np.uint8)] * 3, AUGMENT)
    report = synth.run(params_from_dict({}), Path("aug"), Path("out/synth"))
    df = read_manifest("out/synth/manifest.parquet", SYNTH)
    assert list(df.item_id) == list(src.item_id) and list(df.image_path) == list(src.image_path)
    assert not df.synthetic.any()
    assert read_meta("out/synth/manifest.parquet")["skipped"] == "synth disabled (synth.enabled=false)"
    assert any("synth disabled (synth.enabled=false)" in n for n in report.notes)
    assert report.n_in == report.n_out == 3


def test_enabled_is_refused_until_the_generator_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(Path("aug"), [np.zeros((8, 8, 3), np.uint8)], AUGMENT)
    params = params_from_dict({"synth": {"enabled": True, "n_images": 10}})
    with pytest.raises(synth.GeneratorUnavailable, match="not available yet"):
        synth.run(params, Path("aug"), Path("out/synth"))
    assert not Path("out/synth").exists()
