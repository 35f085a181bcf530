"""End to end: the DVC DAG on the tiny demo, every stage a Prefect flow on one local server."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from defectflow.scratch import copy_project
from flows.server import prefect_server

TINY = {"source.demo_size": "tiny", "train.epochs": 15, "train.n_transforms": 2, "train.n_transforms_test": 2,
        "train.hidden": 128, "train.n_coupling_blocks": 4}


def _project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "proj", TINY)


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dag_end_to_end_on_tiny_demo(tmp_path):
    proj = _project(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(proj)}
    _run(["dvc", "init", "--no-scm", "-q"], proj, env)
    _run([sys.executable, "-m", "defectflow.cli", "demo"], proj, env)
    with prefect_server(home=tmp_path / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        out = _run(["dvc", "repro"], proj, env)
        for stage in ("frames", "detect", "masks", "roi", "augment", "synth", "train", "threshold", "evaluate"):
            assert f"Running stage '{stage}'" in out

        metrics = json.loads((proj / "reports/metrics.json").read_text())
        assert 0.0 <= metrics["image_auroc"] <= 1.0
        scores = pd.read_parquet(proj / "reports/scores.parquet")
        labelled = scores[scores.label != "unknown"]
        assert set(labelled.label) == {"good", "defect"}
        # rank check per head (means of map-max scores are outlier-driven with 3 tiny-demo defects)
        for col in ("score", "score_image", "score_conv"):
            assert roc_auc_score(labelled.label == "defect", labelled[col]) > 0.5, col
        verdicts = pd.read_parquet(proj / "reports/verdicts.parquet")
        assert verdicts.product_id.is_unique and set(verdicts.verdict) <= {"good", "defect"}
        assert (proj / "reports/report.html").stat().st_size > 1000
        test_videos = pd.read_csv(proj / "data/demo/videos.csv").query("split == 'test'")
        annotated = sorted(p.name for p in (proj / "reports/videos").glob("*.mp4"))
        assert annotated == sorted(Path(v).stem + ".mp4" for v in test_videos.video)
        assert (proj / "models/model/model.pt").is_file()

        # nothing changed: nothing reruns
        out = _run(["dvc", "repro"], proj, env)
        assert "Running stage" not in out

        # a threshold param changes: only threshold and evaluate rerun
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["threshold"]["target_tpr"] = 0.7
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = _run(["dvc", "repro"], proj, env)
        ran = {s for s in ("frames", "train", "threshold", "evaluate") if f"Running stage '{s}'" in out}
        assert ran == {"threshold", "evaluate"}

        # score flow: the videos again, as new input -> one verdict per product, no retraining
        model_mtime = (proj / "models/model/model.pt").stat().st_mtime
        _run([sys.executable, "-m", "flows.score", "--source", "data/demo", "--kind", "demo",
              "--out", "data/score"], proj, env)
        scored = pd.read_parquet(proj / "data/score/verdicts.parquet")
        n_products = len(pd.read_csv(proj / "data/demo/passes.csv"))
        assert len(scored) == n_products and scored.n_cameras.eq(4).all()
        score_qa = json.loads((proj / "data/score/report/qa.json").read_text())
        assert score_qa["kind"] == "score" and score_qa["inspected"] == n_products
        assert (proj / "data/score/report/report.pdf").is_file() and list((proj / "data/score/report/videos").glob("*.mp4"))
        kinds = [json.loads(x)["kind"] for x in (proj / "data/history/runs.jsonl").read_text().splitlines()]
        assert kinds[-1] == "score" and "evaluate" in kinds
        assert (proj / "models/model/model.pt").stat().st_mtime == model_mtime


def test_bad_params_stop_a_stage_with_the_key_named(tmp_path):
    proj = _project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["masks"]["shrink"] = 2.0
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "flows.stage", "masks"], cwd=proj, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(proj)}, timeout=120)
    assert proc.returncode == 2
    assert "masks.shrink" in proc.stderr and "Traceback" not in proc.stderr
