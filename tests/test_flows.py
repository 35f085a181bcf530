"""Prefect side: tasks retry only transient I/O errors; the nightly schedule comes from params."""
from types import SimpleNamespace

import pytest

from defectflow.config import ParamsError, params_from_dict
from flows.nightly import schedule
from tasks.common import resolve_params, transient_io


def _state(exc):
    return SimpleNamespace(result=lambda raise_on_failure=False: exc)


def test_only_transient_io_errors_are_retried():
    assert transient_io(None, None, _state(ConnectionResetError("share dropped")))
    assert transient_io(None, None, _state(TimeoutError("nfs")))
    assert not transient_io(None, None, _state(FileNotFoundError("gone")))
    assert not transient_io(None, None, _state(ValueError("bad image")))


def test_nightly_schedule_follows_params():
    cron = schedule(params_from_dict({"nightly": {"cron": "30 3 * * 1-5", "timezone": "Europe/Berlin"}}))
    assert cron.cron == "30 3 * * 1-5" and cron.timezone == "Europe/Berlin"
    with pytest.raises(ParamsError, match="nightly.cron"):
        params_from_dict({"nightly": {"cron": "every night"}})


def test_tasks_take_a_params_file_or_a_dict(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 3\n")
    assert resolve_params(str(f)).seed == 3
    assert resolve_params({"seed": 4}).seed == 4
    with pytest.raises(ParamsError, match="seed"):
        resolve_params({"seed": -1})
