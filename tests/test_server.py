"""flows.server: binds to 127.0.0.1, refuses another address without auth, and stopping the wrapper
by a signal stops the Prefect server it started."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.server import AUTH_ENV, ServerConfigError, check_bind, main

ROOT = Path(__file__).resolve().parents[1]


def test_loopback_is_fine_anything_else_needs_auth():
    check_bind("127.0.0.1", {})
    check_bind("localhost", {})
    check_bind("::1", {})
    with pytest.raises(ServerConfigError, match=AUTH_ENV):
        check_bind("0.0.0.0", {})
    with pytest.raises(ServerConfigError, match="non-loopback"):
        check_bind("192.168.1.20", {AUTH_ENV: ""})
    check_bind("0.0.0.0", {AUTH_ENV: "admin:pw"})


def test_wrapper_refuses_to_start_and_never_prints_the_secret(capsys, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert main(["--serve", "--host", "0.0.0.0"]) == 2
    assert "refusing" in capsys.readouterr().err
    monkeypatch.setenv(AUTH_ENV, "admin:s3cr3t-value")
    with pytest.raises(ServerConfigError) as err:
        check_bind("10.0.0.1", {})
    assert "s3cr3t" not in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_stops_the_server_it_started(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    wrapper = subprocess.Popen([sys.executable, "-m", "flows.server", "--serve", "--port", str(port)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = wrapper.stdout.readline()
        deadline = time.monotonic() + 120
        while "Prefect server up" not in line:
            assert wrapper.poll() is None and time.monotonic() < deadline, f"server did not start: {line}"
            line = wrapper.stdout.readline()
        started = psutil.Process(wrapper.pid).children(recursive=True)
        assert started, "the wrapper should have started the server"
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 143
        gone, alive = psutil.wait_procs(started, timeout=20)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        with socket.socket() as s:                           # nothing listens on the port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # (TIME_WAIT of the health checks is fine)
            s.bind(("127.0.0.1", port))
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
