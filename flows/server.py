"""One Prefect server for a run of many stages.

Prefect 3 with no server starts a temporary one in every process (5-10 s each);
``dvc repro`` runs each stage in its own process, so we start one local server,
point ``PREFECT_API_URL`` at it, and stop it afterwards. An already running server
(``PREFECT_API_URL`` set and healthy, e.g. the plant's) is used as it is.

    python -m flows.server -- dvc repro      # run a command with a server
    python -m flows.server --serve [--host 127.0.0.1] [--port 4200]   # keep a server (and its UI) up

The server binds to 127.0.0.1. Another address (e.g. 0.0.0.0 for the plant's network) is refused
unless ``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``, Prefect's basic auth) is set in the
environment; clients then need ``PREFECT_API_AUTH_STRING``. The string is never logged or written.
Stopping the wrapper by SIGTERM, SIGINT or SIGHUP stops the server's whole process group (and the
command); if the wrapper is killed outright, the server gets SIGTERM from the kernel (parent death signal).
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from defectflow.errors import DefectflowError
from defectflow.procs import popen_tied, stop_group

AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"


class ServerConfigError(DefectflowError):
    """The server would listen on the network without authentication."""


def check_bind(host: str, env: dict | None = None) -> None:
    """Refuse a non-loopback address unless Prefect's server basic auth is configured."""
    env = os.environ if env is None else env
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not env.get(AUTH_ENV):
        raise ServerConfigError(
            f"--host {host}: refusing to serve Prefect on a non-loopback address without authentication; "
            f"set {AUTH_ENV}=user:password in the environment (not in params.yaml or the repo), or use 127.0.0.1")

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
    import base64

    req = urllib.request.Request(f"{api_url.rstrip('/')}/health")
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get(AUTH_ENV)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path | str = ".prefect", port: int | None = None,
                   wait_s: float = 90.0, scheduler: bool = False, host: str = "127.0.0.1") -> Iterator[str]:
    """Yield the API URL of a healthy Prefect server, starting a local one if needed.

    ``scheduler`` runs the server's scheduling services (needed by ``flows.nightly``);
    a server for one ``dvc repro`` does without them and starts faster.
    """
    quiet_environment()
    existing = os.environ.get("PREFECT_API_URL")
    if existing and healthy(existing):
        yield existing
        return
    check_bind(host)
    port = port or _free_port()
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    api_url = f"http://{reach}:{port}/api"
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}
    log = open(home / "server.log", "ab")
    proc = popen_tied(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host,
         "--port", str(port), "--analytics-off",
         *([] if scheduler else ["--no-scheduler", "--no-late-runs"])],
        env=env, stdout=log, stderr=subprocess.STDOUT)
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
        stop_group(proc)
        log.close()


class Stopped(Exception):
    """A stop signal arrived (SIGTERM, SIGHUP)."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        argv, cmd = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="keep a server with its UI up until stopped")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default: 4200 with --serve, else a free port")
    args, rest = ap.parse_known_args(argv)
    cmd = rest + cmd
    if not args.serve and not cmd:
        print(__doc__)
        return 2
    try:
        check_bind(args.host)
    except ServerConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stopped)
    try:
        if args.serve:
            with prefect_server(port=args.port or 4200, scheduler=True, host=args.host) as url:
                print(f"Prefect server up on {args.host}: UI at {url.removesuffix('/api')}  (Ctrl-C to stop)",
                      flush=True)
                while True:
                    time.sleep(3600)
        with prefect_server(port=args.port, host=args.host) as url:
            print(f"Prefect server at {url}", flush=True)
            child = popen_tied(cmd)
            try:
                return child.wait()
            finally:
                stop_group(child)        # before the server goes: the command may still be using it
    except (KeyboardInterrupt, Stopped) as why:
        print(f"stopping ({why or 'SIGINT'}): the server and what it started", file=sys.stderr, flush=True)
        return 143 if isinstance(why, Stopped) else 130


if __name__ == "__main__":
    sys.exit(main())
