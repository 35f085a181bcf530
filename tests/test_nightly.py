"""The nightly retrain: run lock, a SIGKILL mid-training, stops with the champion untouched, the gate,
the registry (MLflow on SQLite) and its CLI, prefect.yaml from params."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import nightly_fakes as nf
from defectflow.cli import main as cli
from defectflow.config import load_params
from defectflow.ingest import IngestError
from defectflow.nightly import NightlyBusy, NightlyError, run_nightly
from defectflow.registry.gate import GateError
from defectflow.registry.store import Registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """One migrated, empty registry database, copied into each project (MLflow's schema setup takes seconds)."""
    root = tmp_path_factory.mktemp("regdb")
    Registry(root).client
    return root / "mlflow.db"


@pytest.fixture
def project(tmp_path, empty_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return nf.make_project(tmp_path, registry_db=empty_db, registry={"keep": 3})


def nightly(project, quality, **kw):
    return run_nightly(load_params(project / "params.yaml"), project, repro_cmd=nf.repro_cmd(quality, **kw),
                       scorer=nf.fake_scorer, evaluation=nf.fake_eval)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _wait_for(cond, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_first_model_promoted_worse_one_rejected_and_kept(project, capsys):
    first = nightly(project, 2.0).decision
    assert first.promoted and first.champion is None and "first model" in first.reasons[0]
    worse = nightly(project, 0.1).decision
    assert not worse.promoted
    assert worse.challenger["metrics"]["image_auroc"] < worse.champion["metrics"]["image_auroc"] - 0.02
    assert any("AUROC drop" in r and ">" in r for r in worse.reasons)
    reg = Registry(project / "registry")
    assert [(v.version, v.status) for v in reg.list()] == [(1, "champion"), (2, "rejected")]
    assert reg.champion_version() == 1 and (reg.get(2).model_dir / "quality.txt").read_text() == "0.1"
    assert nf.decision_file(project, 2)["promoted"] is False
    assert nightly(project, 0.1).decision is None            # same model again: nothing new to gate
    better = nightly(project, 3.0).decision
    assert better.promoted and better.champion["version"] == 1
    assert cli(["models", "list", "--params", "params.yaml"]) == 0
    out = capsys.readouterr().out
    assert "*champion" in out and "rejected" in out and "archived" in out and "champion: 3" in out
    assert cli(["models", "rollback", "1", "--params", "params.yaml"]) == 0
    assert reg.champion_version() == 1 and reg.get(3).status == "archived"
    assert cli(["models", "rollback", "2", "--params", "params.yaml"]) == 2   # 2 >= champion 1
    assert cli(["models", "promote", "3", "--params", "params.yaml"]) == 0
    assert reg.champion_version() == 3


def test_keep_last_n_but_never_the_champion(project):
    nightly(project, 2.0)
    for q in (0.1, 0.2, 0.3):
        nightly(project, q)
    reg = Registry(project / "registry")
    assert [(v.version, v.status) for v in reg.list()] == [
        (1, "champion"), (2, "rejected"), (3, "rejected"), (4, "rejected")]     # keep 3 + champion
    nightly(project, 0.4)
    assert [v.version for v in reg.list()] == [1, 3, 4, 5]
    assert len(list((project / "registry" / "artifacts").iterdir())) == 4


def test_tolerance_from_params_rejects_an_equal_model(tmp_path, empty_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = nf.make_project(tmp_path, registry_db=empty_db, gate={"max_auroc_drop": -1.0})
    nightly(p, 2.0)
    d = nightly(p, 2.5).decision
    assert not d.promoted and d.tolerances["max_auroc_drop"] == -1.0


def test_second_run_exits_at_once_while_one_runs(project):
    nf.write_driver(project)
    first = subprocess.Popen([sys.executable, "driver.py", "2.0", "30"], cwd=project, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list((project / "models").glob(".model.*.tmp")), what="the first run to train")
        t0 = time.monotonic()
        with pytest.raises(NightlyBusy, match=r"another run holds .*\.nightly\.lock since .*pid "
                                              rf"{first.pid}, nightly\), exiting"):
            nightly(project, 2.0)
        assert time.monotonic() - t0 < 3.0
        assert cli(["nightly", "--params", "params.yaml"]) == 2          # the CLI says so and exits
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_sigkill_mid_training_leaves_champion_and_next_run_cleans_up(project):
    nightly(project, 2.0)
    champ_files = (project / "registry").joinpath("artifacts").iterdir().__next__()
    nf.write_driver(project)
    proc = subprocess.Popen([sys.executable, "driver.py", "0.5", "60"], cwd=project, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: list((project / "models").glob(".model.*.tmp")), what="training to start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list((project / "models").glob(".model.*.tmp"))
    assert left, "the killed run should have left its temp folder"
    reg = Registry(project / "registry")
    assert reg.champion_version() == 1 and [v.version for v in reg.list()] == [1]
    assert (champ_files / "model" / "quality.txt").read_text() == "2.0"
    assert (project / "models" / "model" / "quality.txt").read_text() == "2.0"   # the old model stays in place
    _wait_for(lambda: not _fake_training_running(project), timeout=15, what="the orphaned training to die")
    d = nightly(project, 3.0).decision
    assert d.promoted and d.challenger["version"] == 2
    assert not any(p.exists() for p in left)


def _fake_training_running(project: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", "fake_repro.py 0.5"], capture_output=True, text=True).stdout.split()
    return any(Path(f"/proc/{pid}/cwd").resolve() == project.resolve() for pid in out if Path(f"/proc/{pid}").exists())


def test_nan_loss_stops_with_champion_untouched(project):
    nightly(project, 2.0)
    with pytest.raises(GateError, match="NaN or infinite loss"):
        nightly(project, 3.0, loss="nan")
    reg = Registry(project / "registry")
    assert reg.champion_version() == 1 and [v.version for v in reg.list()] == [1]


def test_empty_good_set_stops_before_training(tmp_path, empty_db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = nf.make_project(tmp_path, n_train=0, registry_db=empty_db)
    called = []
    with pytest.raises(NightlyError, match="no good training samples"):
        run_nightly(load_params(p / "params.yaml"), p, repro=lambda: called.append(1),
                    scorer=nf.fake_scorer, evaluation=nf.fake_eval)
    assert not called and Registry(p / "registry").champion_version() is None


def test_ingest_that_rejects_everything_stops_the_run(project):
    nightly(project, 2.0)
    inbox = project / "data" / "inbox"
    inbox.mkdir()
    (inbox / "n1_cam0.avi").write_bytes(b"not a video")
    with pytest.raises(IngestError, match="rejected every file"):
        nightly(project, 3.0)
    assert Registry(project / "registry").champion_version() == 1
    assert (project / "models" / "model" / "quality.txt").read_text() == "2.0"      # not retrained


def test_prefect_yaml_matches_params():
    from flows.nightly import deployment_spec

    spec = deployment_spec(load_params(ROOT / "params.yaml"))
    on_disk = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert on_disk == spec, "prefect.yaml is stale: python -m flows.nightly --write-prefect-yaml"
    dep = on_disk["deployments"][0]
    assert dep["schedules"][0]["cron"] == load_params(ROOT / "params.yaml").nightly.cron
    assert dep["entrypoint"] == "flows/nightly.py:nightly"


def test_scoring_and_export_read_the_champion_not_a_rejected_challenger(project, caplog):
    import logging

    from defectflow.registry.store import champion_or_default

    params = load_params(project / "params.yaml")
    log = logging.getLogger("defectflow.test")
    with caplog.at_level(logging.WARNING):
        assert champion_or_default(params, Path("models/model"), Path("models/threshold.json"), log) == (
            Path("models/model"), Path("models/threshold.json"))
    assert "no champion" in caplog.text
    nightly(project, 2.0)
    nightly(project, 0.1)                                   # rejected: models/model is now the worse one
    model_dir, thr = champion_or_default(params, Path("models/model"), Path("models/threshold.json"), log)
    assert (model_dir / "quality.txt").read_text() == "2.0" and thr.is_file()
    assert (project / "models/model/quality.txt").read_text() == "0.1"


def test_a_version_registered_but_never_decided_is_gated_by_the_next_run(project, monkeypatch):
    nightly(project, 2.0)

    def die(self, version, reasons):
        raise KeyboardInterrupt("killed between register and decision")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(Registry, "promote", die)
        nightly(project, 3.0)
    reg = Registry(project / "registry")
    assert reg.get(2).status == "candidate" and reg.champion_version() == 1
    d = run_nightly(load_params(project / "params.yaml"), project, repro=lambda: None,
                    scorer=nf.fake_scorer, evaluation=nf.fake_eval).decision
    assert d.promoted and d.challenger["version"] == 2 and [v.version for v in reg.list()] == [1, 2]
