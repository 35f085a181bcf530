"""The offline DVC plots template (tools/dvc_plots, `make plots`): built from node_modules, a
`dvc plots show` / `dvc plots diff` page made with it loads no script from elsewhere (the default
template's CDN scripts are caught), and node renders every plot with only what the page inlines.
Skipped until `npm ci` has run in tools/dvc_plots (`make plots` runs it)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_dvc_exp_plots import _retrain, _run, scratch_project
from tests.test_dvc_remote import DVC, dvc_env

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "dvc_plots"
CDN = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.")

pytestmark = pytest.mark.skipif(not (TOOLS / "node_modules").is_dir() or shutil.which("node") is None,
                                reason="no tools/dvc_plots/node_modules (run `npm ci` there, or `make plots`) or no node")


def _check(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(TOOLS / "check_offline.js"), str(page)], capture_output=True, text=True,
                          timeout=120)


def test_the_offline_template_renders_show_and_diff_pages_without_the_network(tmp_path):
    env = dvc_env()
    template = tmp_path / "offline.html"
    built = subprocess.run([sys.executable, str(TOOLS / "make_template.py"), str(template)], capture_output=True,
                           text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    assert "{plot_divs}" in template.read_text() and not any(c in template.read_text() for c in CDN)

    repo = scratch_project(tmp_path, env)
    _retrain(repo, env, 1.0, "retrain-a")
    _retrain(repo, env, 1.5, "retrain-b")

    pages = {}
    for name, cmd in {"show": ["plots", "show"], "diff": ["plots", "diff", "retrain-a", "retrain-b"],
                      "default": ["plots", "show"]}.items():
        extra = [] if name == "default" else ["--html-template", str(template)]
        _run([str(DVC), *cmd, *extra, "-o", str(tmp_path / name)], repo, env)
        pages[name] = tmp_path / name / "index.html"
    for name in ("show", "diff"):
        html = pages[name].read_text()
        assert "<script src" not in html.replace(" ", "") and not any(c in html for c in CDN), name
        res = _check(pages[name])
        assert res.returncode == 0, f"{name}: {res.stderr[-2000:]}"
        plots = json.loads(res.stdout)["plots"]
        assert [p["id"] for p in plots] == ["ROC"] and plots[0]["marks"] > 10
    assert "retrain-b" in pages["diff"].read_text()
    # DVC's own template loads vega from a CDN: the check says so, naming the page
    assert any(c in pages["default"].read_text() for c in CDN)
    res = _check(pages["default"])
    assert res.returncode == 1 and str(pages["default"]) in res.stderr and "cdn.jsdelivr.net" in res.stderr
