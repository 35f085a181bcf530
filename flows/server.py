"""One Prefect server for a run of many stages.

Prefect 3 with no server starts a temporary one in every process (5-10 s each);
``dvc repro`` runs each stage in its own process, so we start one local server,
point ``PREFECT_API_URL`` at it, and stop it afterwards. An already running server
(``PREFECT_API_URL`` set and healthy, e.g. the plant's) is used as it is.

    python -m flows.server -- dvc repro      # run a command with a server
    python -m flows.server --serve           # keep a server (and its UI) up
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "defectflow",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # library code also runs outside flows
}


def quiet_environment() -> None:
    """No analytics (there is no internet) and defectflow's log lines in the Prefect UI."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("defectflow").setLevel(logging.INFO)


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path | str = ".prefect", port: int | None = None,
                   wait_s: float = 90.0, scheduler: bool = False) -> Iterator[str]:
    """Yield the API URL of a healthy Prefect server, starting a local one if needed.

    ``scheduler`` runs the server's scheduling services (needed by ``flows.nightly``);
    a server for one ``dvc repro`` does without them and starts faster.
    """
    quiet_environment()
    existing = os.environ.get("PREFECT_API_URL")
    if existing and healthy(existing):
        yield existing
        return
    port = port or _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--analytics-off",
         *([] if scheduler else ["--no-scheduler", "--no-late-runs"])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s
        while not healthy(api_url):
            if proc.poll() is not None:
                raise RuntimeError(f"Prefect server exited early (code {proc.returncode}); see {home / 'server.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server not healthy after {wait_s:.0f}s; see {home / 'server.log'}")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = api_url
        os.environ["PREFECT_HOME"] = str(home)
        yield api_url
    finally:
        if existing is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = existing
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        with prefect_server(port=4200, scheduler=True) as url:
            print(f"Prefect server up: UI at {url.removesuffix('/api')}  (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    with prefect_server() as url:
        print(f"Prefect server at {url}", flush=True)
        return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main())
