"""Frames..roi of the tiny demo on a Dask LocalCluster of 2 workers = the library's own serial map.

(The threads runner against the serial map is the same comparison; tests/test_units.py checks that the
order units run in does not matter. One Prefect run here keeps the test near a minute.)"""
import hashlib
import json
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from defectflow.config import load_params
from defectflow.scratch import copy_project
from defectflow.sources import demo
from flows.server import prefect_server

STAGES = ("frames", "detect", "masks", "roi")


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.parquet"}


def _run_stages(proj: Path, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.stage", *STAGES], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _set_scale(proj: Path, **scale) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["scale"].update(scale)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dask_cluster_gives_the_manifests_of_the_default_runner(tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    proj = copy_project(tmp_path / "proj", {"source.demo_size": "tiny", "roi.method": "mask"})
    demo.generate(proj / "data/demo", size="tiny", seed=0)
    videos = pd.read_csv(proj / "data/demo/videos.csv")
    videos[videos.run == "val-00"].to_csv(proj / "data/demo/videos.csv", index=False)   # 4 videos: keep it short
    store = tmp_path / "shared_store"                # what every worker reaches: here a local folder
    env = {**os.environ, "PYTHONPATH": str(proj), "DEFECTFLOW_CACHE": str(store),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    monkeypatch.chdir(proj)
    params = load_params(proj / "params.yaml")
    params = params.model_copy(update={"scale": params.scale.model_copy(update={"unit_cache": False})})
    inp = Path("data/demo")
    for stage in STAGES:                              # the library's default: units one after the other
        out = Path("data") / stage
        importlib.import_module(f"defectflow.{stage}").run(params, inp, out)
        inp = out
    shutil.move(proj / "data", tmp_path / "threads")
    shutil.copytree(tmp_path / "threads/demo", proj / "data/demo")
    with prefect_server(home=tmp_path / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        _set_scale(proj, runner="dask", workers=2, unit_cache=True)
        _run_stages(proj, env)
    for stage in STAGES:
        threads, dask = tmp_path / "threads" / stage, proj / "data" / stage
        pd.testing.assert_frame_equal(pd.read_parquet(threads / "manifest.parquet"),
                                      pd.read_parquet(dask / "manifest.parquet"))
        assert _digests(threads) == _digests(dask), stage
        assert len(list((store / "units" / stage).iterdir())) == 4, stage    # workers wrote one entry per video


def test_a_unit_whose_dask_worker_dies_is_rerun_on_another_worker(tmp_path):
    """The first attempt at unit u2 kills its worker process (``os._exit``); Dask reschedules it on the
    other worker (Prefect retries off) and the map completes with every unit's right result."""
    pytest.importorskip("prefect_dask")
    root = Path(__file__).resolve().parents[1]
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with prefect_server(home=tmp_path / "prefect") as api_url:
        env["PREFECT_API_URL"] = api_url
        proc = subprocess.run([sys.executable, str(root / "tests/dask_fakes.py"), str(tmp_path / "out"), str(markers)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT=")[-1])
    dead_pid = int((markers / "u2").read_text())                    # the attempt that killed its worker ran
    assert result["errors"] == []
    assert [r["unit"] for r in result["rows"]] == [f"u{i}" for i in range(6)]
    assert [r["square"] for r in result["rows"]] == [i * i for i in range(6)]
    assert next(r["pid"] for r in result["rows"] if r["unit"] == "u2") != dead_pid
    assert {p.name: p.read_text() for p in (tmp_path / "out").glob("*.txt")} == {f"u{i}.txt": str(i * i) for i in range(6)}
