"""The score flow on an images folder: streamed in chunks, scored in parts through threads and through a
2-worker Dask LocalCluster, the same scores and one report either way."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from defectflow import threshold, train
from defectflow.config import load_params
from defectflow.scratch import copy_project
from flows.server import prefect_server
from test_model_stages import TRAIN, make_dataset

SCALE = {"score_chunk": 1, "unit_images": 3, "unit_cache": False, "workers": 2}


def _score(proj: Path, env: dict, runner: str, out: str) -> dict:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["scale"].update(SCALE, runner=runner)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "flows.score", "--source", "new", "--kind", "images", "--out", out],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")))


def test_images_are_scored_in_chunks_and_parts_with_the_same_scores_on_threads_and_dask(tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    overrides = {"seed": 3, "masks.method": "none", "roi.method": "none", "evaluate.pdf": False,
                 **{f"train.{k}": v for k, v in TRAIN.items()}}
    proj = copy_project(tmp_path / "proj", overrides)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("DEFECTFLOW_CACHE", str(tmp_path / "cache"))
    inp, df = make_dataset(Path("data"), n_val=6)
    params = load_params("params.yaml")
    train.run(params, inp, Path("models/model"))
    threshold.run(params, inp, Path("models/model"), Path("models/threshold.json"), Path("models/val_scores.parquet"))
    new = Path("new")                                   # 7 new images: 3 chunks of 3 (score_chunk 1 x unit_images 3)
    for i, p in enumerate(sorted(df[df.split != "train"].image_path)[:7]):
        (new / ("a" if i < 4 else "b")).mkdir(parents=True, exist_ok=True)
        os.link(p, new / ("a" if i < 4 else "b") / f"img{i}.png")
    env = {**os.environ, "PYTHONPATH": str(proj), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with prefect_server(home=tmp_path / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        threads = _score(proj, env, "threads", "data/score-threads")
        dask = _score(proj, env, "dask", "data/score-dask")
    for got in (threads, dask):
        assert got["chunks"] == 3 and got["score_parts"] == 3 and got["views"] == got["products"] == 7
    assert sorted(p.name for p in Path("data/score-threads/work").iterdir()) == [f"chunk-{k:04d}" for k in range(3)]
    a = pd.read_parquet("data/score-threads/scores.parquet")
    b = pd.read_parquet("data/score-dask/scores.parquet")
    assert sorted(a.item_id) == sorted(f"{d}/img{i}" for i, d in enumerate("aaaabbb"))
    pd.testing.assert_frame_equal(a, b)
    assert a["score"].notna().all()
    qa = json.loads(Path("data/score-dask/report/qa.json").read_text())
    assert qa["kind"] == "score" and qa["inspected"] == 7
