"""A real Prefect server from ``flows.server`` on 0.0.0.0 with basic auth: clients without the auth
string get 401, ``prefect deploy`` of the generated prefect.yaml lands with params' cron, time zone,
entrypoint and pool, and the secret appears in no log or output."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from defectflow.config import load_params_with
from flows.nightly import ENTRYPOINT, HOME_CHECK, write_prefect_yaml
from flows.server import AUTH_ENV

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", AUTH_ENV, "PREFECT_HOME")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """flows.server --serve --host 0.0.0.0 with a random user:password; stopped by SIGTERM afterwards."""
    home = tmp_path_factory.mktemp("server")
    secret = f"df-user:{uuid.uuid4().hex}"
    port = _free_port()
    out = home / "wrapper.out"
    with open(out, "w") as fh:
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "flows.server", "--serve", "--host", "0.0.0.0", "--port", str(port)],
            cwd=home, env=_clean_env(**{AUTH_ENV: secret}), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Prefect server up" not in out.read_text():
            assert wrapper.poll() is None and time.monotonic() < deadline, f"no server: {out.read_text()}"
            time.sleep(0.5)
        client_home = home / "client"
        client_env = _clean_env(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_HOME=str(client_home))
        yield SimpleNamespace(port=port, secret=secret, home=home, wrapper=wrapper, out=out,
                              url=f"http://127.0.0.1:{port}/api", client_env=client_env)
    finally:
        wrapper.send_signal(signal.SIGTERM)
        try:
            wrapper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            wrapper.kill()


def _get(url: str, auth: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, {}


def _prefect(server, *args, auth: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(server.client_env, **({"PREFECT_API_AUTH_STRING": server.secret} if auth else {}))
    return subprocess.run([*PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _logs(server) -> str:
    assert (server.home / ".prefect" / "server.log").stat().st_size > 0
    return "\n".join(p.read_text(errors="replace") for p in server.home.rglob("*")
                     if p.is_file() and p.suffix in (".log", ".out"))


def test_basic_auth_refuses_clients_without_the_string(server):
    listening = {c.laddr for p in psutil.Process(server.wrapper.pid).children(recursive=True)
                 for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ("0.0.0.0", server.port) in listening, listening
    user, password = server.secret.split(":")
    assert _get(f"{server.url}/admin/version")[0] == 401
    assert _get(f"{server.url}/admin/version", f"{user}:wrong")[0] == 401
    status, version = _get(f"{server.url}/admin/version", server.secret)
    assert status == 200 and version.startswith("3.")
    refused = _prefect(server, "work-pool", "ls", auth=False)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    allowed = _prefect(server, "work-pool", "ls")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    for text in (_logs(server), refused.stdout, refused.stderr, allowed.stdout, allowed.stderr):
        assert password not in text


def test_prefect_deploy_of_generated_yaml_lands_on_the_pool(server, tmp_path):
    params = load_params_with(ROOT / "params.yaml", {"nightly.cron": "30 3 * * 1-5",
                                                     "nightly.timezone": "Europe/Berlin",
                                                     "nightly.work_pool": "df-test"})
    spec = write_prefect_yaml(params, tmp_path / "prefect.yaml")
    pool = _prefect(server, "work-pool", "create", "df-test", "--type", "process")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    dep = _prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", str(spec))
    assert dep.returncode == 0 and "successfully created" in dep.stdout, dep.stdout + dep.stderr
    status, d = _get(f"{server.url}/deployments/name/nightly/nightly-retrain", server.secret)
    assert status == 200
    assert d["entrypoint"] == ENTRYPOINT and d["work_pool_name"] == "df-test"
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in d["schedules"]] == \
        [("30 3 * * 1-5", "Europe/Berlin", True)]
    assert d["parameters"] == {"params_path": "params.yaml"}
    assert d["pull_steps"][0]["prefect.deployments.steps.run_shell_script"]["script"] == HOME_CHECK
    assert d["pull_steps"][1] == {"prefect.deployments.steps.set_working_directory":
                                  {"directory": "{{ $DEFECTFLOW_HOME }}"}}
    assert server.secret.split(":")[1] not in _logs(server) + dep.stdout + dep.stderr
