"""The README's recipe for comparing two retrains when ``reports/`` is gitignored (``cache: false``):
``dvc repro`` + ``dvc exp save -n NAME`` per retrain, then ``dvc exp show`` / ``dvc plots diff A B``.
A scratch git + DVC repo with a tiny stage shaped like evaluate; ``dvc exp run`` is checked to lose the
plots (why the recipe saves instead)."""
import json

import pytest

from tests.test_dvc_remote import DVC, dvc_env
from tests.test_dvc_remote import _run as _run_both
MAKE = """import json, os, yaml
gain = yaml.safe_load(open("params.yaml"))["gain"]
os.makedirs("reports", exist_ok=True)
with open("reports/roc.csv", "w") as f:
    f.write("fpr,tpr\\n" + "".join(f"{x / 10},{min(1.0, gain * x / 10)}\\n" for x in range(11)))
json.dump({"auroc": gain / 2}, open("reports/metrics.json", "w"))
"""
DVC_YAML = """stages:
  evaluate:
    cmd: python make.py
    deps: [make.py]
    params: [gain]
    outs:
      - reports:
          cache: false
metrics:
  - reports/metrics.json
plots:
  - ROC:
      x: fpr
      y:
        reports/roc.csv: tpr
"""


def _run(args, cwd, env):
    return _run_both(args, cwd, env, stderr=False)


def _retrain(repo, env, gain, name):
    (repo / "params.yaml").write_text(f"gain: {gain}\n")
    _run([str(DVC), "repro", "-q"], repo, env)
    _run([str(DVC), "exp", "save", "-q", "-n", name], repo, env)


def scratch_project(tmp_path, env):
    """A git + DVC repo with the evaluate-like stage, committed; ``reports/`` gitignored."""
    repo = tmp_path / "project"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([str(DVC), "init", "-q"], repo, env)
    (repo / "make.py").write_text(MAKE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("gain: 1.0\n")
    (repo / ".gitignore").write_text("/reports/\n")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "init"], repo, env)
    return repo


def test_two_saved_retrains_compare_with_exp_show_and_plots_diff_without_committing_reports(tmp_path):
    env = dvc_env()
    repo = scratch_project(tmp_path, env)
    head = _run(["git", "rev-parse", "HEAD"], repo, env)

    # dvc exp run alone keeps only git-tracked files: the gitignored plots are gone from the experiment
    _run([str(DVC), "exp", "run", "-q", "-n", "lost", "-S", "gain=1.2"], repo, env)
    lost = json.loads(_run([str(DVC), "plots", "diff", "lost", "--json"], repo, env))
    assert lost.get("errors") and lost["errors"][0]["source"] == "reports/roc.csv"

    _retrain(repo, env, 1.0, "retrain-a")
    _retrain(repo, env, 1.5, "retrain-b")
    assert _run(["git", "rev-parse", "HEAD"], repo, env) == head       # nothing committed on the branch
    assert "reports" not in _run(["git", "ls-files"], repo, env)

    shown = json.loads(_run([str(DVC), "exp", "show", "--json"], repo, env))
    auroc = {e["name"]: e["data"]["metrics"]["reports/metrics.json"]["data"]["auroc"]
             for rev in shown for e in (x for x in rev.get("experiments") or [] for x in x["revs"])
             if e.get("name") in ("retrain-a", "retrain-b")}
    assert auroc == {"retrain-a": 0.5, "retrain-b": 0.75}

    metrics = json.loads(_run([str(DVC), "metrics", "diff", "retrain-a", "retrain-b", "--json"], repo, env))
    assert metrics["reports/metrics.json"]["auroc"] == {"old": 0.5, "new": 0.75, "diff": 0.25}
    diff = json.loads(_run([str(DVC), "plots", "diff", "retrain-a", "retrain-b", "--json"], repo, env))
    assert not diff.get("errors")
    values = diff["data"]["ROC"][0]["content"]["data"]["values"]
    tpr = {(v["rev"], v["fpr"]): float(v["tpr"]) for v in values}
    assert tpr[("retrain-a", "0.6")] == pytest.approx(0.6) and tpr[("retrain-b", "0.6")] == pytest.approx(0.9)
    html = repo / "diff_html"
    _run([str(DVC), "plots", "diff", "retrain-a", "retrain-b", "-o", str(html)], repo, env)
    assert "retrain-b" in (html / "index.html").read_text()
