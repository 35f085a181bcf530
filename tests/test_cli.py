import pandas as pd

from defectflow.cli import main
from tests.test_images_source import make_mvtec


def test_check_names_the_bad_key(tmp_path, capsys):
    f = tmp_path / "params.yaml"
    f.write_text("roi:\n  method: square\n")
    assert main(["check", str(f)]) == 2
    assert "roi.method" in capsys.readouterr().err


def test_stage_runs_one_vision_stage_without_prefect(tmp_path, capsys):
    root = make_mvtec(tmp_path / "bottle")
    f = tmp_path / "params.yaml"
    f.write_text(f"source:\n  kind: images\n  path: {root}\n")
    assert main(["stage", "frames", "--params", str(f), "--inp", str(root), "--out", str(tmp_path / "frames")]) == 0
    assert "frames: read" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "frames/manifest.parquet")) == 15
