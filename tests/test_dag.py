"""dvc.yaml, flows/stage.py and defectflow/layout.py describe the same DAG."""
from pathlib import Path

import yaml

from defectflow import layout
from flows.stage import STAGE_ARGS, STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _outs(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}


def test_all_nine_stages_run_as_prefect_flows_in_order():
    assert list(DVC["stages"]) == list(STAGES) == [
        "frames", "detect", "masks", "roi", "augment", "synth", "train", "threshold", "evaluate"]
    for name, stage in DVC["stages"].items():
        assert stage["cmd"] == f"python -m flows.stage {name}"
        assert stage["params"], f"{name} declares no params"


def test_dvc_paths_match_the_layout_the_flows_use():
    from defectflow.config import Params

    params = Params()
    for name, stage in DVC["stages"].items():
        *inputs, output = STAGE_ARGS[name](params)
        if name == "threshold":
            inputs, output = inputs[:2], None
            assert _outs(stage) == {str(layout.THRESHOLD_FILE), str(layout.VAL_SCORES_FILE)}
        if output is not None:
            assert _outs(stage) == {output}
        deps = set(stage["deps"])
        for path in inputs:
            assert path in deps or (name == "frames" and "${source.path}" in deps), (name, path)


def test_metrics_and_plots_are_declared():
    assert DVC["metrics"] == ["reports/metrics.json"]
    plots = {next(iter(p)): next(iter(p.values())) for p in DVC["plots"]}
    assert "models/model/train_loss.csv" in plots
    files = {name: set(spec["y"]) for name, spec in plots.items() if isinstance(spec, dict) and "y" in spec
             and isinstance(spec["y"], dict)}
    assert files["ROC"] == {"reports/roc.csv"} and files["precision-recall"] == {"reports/pr.csv"}
    assert files["confusion"] == {"reports/confusion.csv"} and plots["confusion"]["template"] == "confusion"
    assert files["score-histogram"] == {"reports/scores_hist.csv"}
