"""Open a report in headless Chromium over the DevTools protocol: screenshot, broken images, videos that
do not load, and requests that leave the machine.

    python tests/browser_check.py reports/report.html [--screenshot out.png]   # prints JSON, exit 1 on problems

Name resolution is switched off for every host but localhost, so a request for a remote URL fails
here as well as being listed.
"""
from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROBE = """(async () => {
  const vids = [...document.querySelectorAll('video')];
  await Promise.all(vids.map(v => v.readyState >= 1 ? null : new Promise(r => {
    v.addEventListener('loadedmetadata', r, {once: true}); v.addEventListener('error', r, {once: true});
    setTimeout(r, 15000); v.load(); })));
  return JSON.stringify({
    images: [...document.images].map(i => ({src: i.currentSrc.startsWith('data:') ? i.currentSrc.slice(0, 40) : i.currentSrc, complete: i.complete,
                                            width: i.naturalWidth})),
    videos: vids.map(v => ({src: v.currentSrc, readyState: v.readyState, duration: v.duration,
                            error: v.error ? v.error.code : null})),
    height: document.documentElement.scrollHeight});
})()"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def local(url: str) -> bool:
    return url.startswith(("file:", "data:", "blob:", "about:", "chrome:", "devtools:")) or \
        url.split("/")[2].split(":")[0] in ("localhost", "127.0.0.1") if "://" in url else True


class _Cdp:
    def __init__(self, ws_url: str):
        from websockets.sync.client import connect
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=20)
        self.n = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == name for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic()))))


def open_report(html: Path, screenshot: Path | None = None, width: int = 1280, height: int = 900) -> dict:
    """Load ``html``; returns {images, videos, requests, external, screenshot}."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    profile = Path(tempfile.mkdtemp(prefix="report-browser-"))
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--mute-audio", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        cdp = _Cdp(page["webSocketDebuggerUrl"])
        cdp.call("Network.enable")
        cdp.call("Page.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        cdp.call("Page.navigate", url=Path(html).resolve().as_uri())
        cdp.wait_event("Page.loadEventFired")
        probe = json.loads(cdp.call("Runtime.evaluate", expression=PROBE, awaitPromise=True,
                                    returnByValue=True)["result"]["value"])
        shot = None
        if screenshot is not None:
            data = cdp.call("Page.captureScreenshot", format="png")["data"]
            Path(screenshot).write_bytes(base64.b64decode(data))
            shot = str(screenshot)
        requests = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
        cdp.ws.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    return {**probe, "requests": [u[:120] for u in requests], "external": [u for u in requests if not local(u)],
            "screenshot": shot}


def problems(result: dict) -> list[str]:
    """What makes a report fail: a broken image, a video without metadata or duration, a remote request."""
    out = [f"broken image {i['src']}" for i in result["images"] if not i["complete"] or i["width"] == 0]
    for v in result["videos"]:
        if v["readyState"] < 1 or not (v["duration"] or 0) > 0:
            out.append(f"video does not load: {v['src']} (readyState {v['readyState']}, duration {v['duration']}, "
                       f"error {v['error']})")
    out += [f"request leaves the machine: {u}" for u in result["external"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args(argv)
    result = open_report(args.html, args.screenshot)
    found = problems(result)
    print(json.dumps({"images": len(result["images"]), "videos": result["videos"], "external": result["external"],
                      "problems": found, "screenshot": result["screenshot"]}))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
