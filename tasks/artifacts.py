"""Prefect artifacts of evaluate and score runs (the Artifacts page), and progress artifacts of long stages.

Keys are stable per line so the UI keeps one history per artifact: ``<kind>-<line>-summary`` (markdown),
``<kind>-<line>-metrics`` and ``<kind>-<line>-flagged`` (tables); progress: ``<stage>-<line>-progress``.
"""
from __future__ import annotations

import contextlib
import re
import threading
from typing import Iterator

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact

KEY_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
METRIC_KEYS = ("image_auroc", "pixel_auroc", "accuracy", "precision", "recall", "f1", "fpr", "product_accuracy",
               "n_test", "n_products", "n_products_flagged", "threshold")


def artifact_key(kind: str, line: str, part: str) -> str:
    key = f"{kind}-{line}-{part}".lower()
    if not KEY_RE.match(key):
        raise ValueError(f"artifact key {key!r}: only lowercase letters, digits and dashes")
    return key


def summary_markdown(qa: dict) -> str:
    """What QA asks first, as the Artifacts page shows it."""
    pct = (lambda r: "n/a" if r is None else f"{100 * r:.1f}%")
    lines = [f"# {qa['kind']} run on {qa['line']}", "",
             f"**{qa['inspected']}** products inspected: **{qa['passed']}** passed, **{qa['flagged']}** flagged, "
             f"**{qa['review']}** sent to review; defect rate **{pct(qa['defect_rate'])}**.", "",
             "| run | inspected | passed | review | flagged | defect rate |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['inspected']} | {r['passed']} | {r['review']} | {r['flagged']} | {pct(r['defect_rate'])} |"
              for r in qa["per_run"]]
    lines += ["", "| camera | seen | passed | review | flagged |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['camera']} | {r['inspected']} | {r['passed']} | {r['review']} | {r['flagged']} |"
              for r in qa["per_camera"]]
    card = qa.get("card") or {}
    lines += ["", f"Model `{card.get('model_version')}`, params `{card.get('params_hash')}`, data "
              f"`{card.get('data_hash')}`, git `{card.get('git_commit')}`, threshold {qa['threshold']:.4g}."]
    fams = qa.get("families")
    if fams:
        ari = "" if fams.get("ari") is None else f", adjusted Rand index {fams['ari']:.3f} against the true types"
        lines.append(f"Defect families: {fams['k']} among {fams['n']} flagged images{ari}.")
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict | None, qa: dict) -> list[dict]:
    rows = [{"metric": k, "value": qa[k]} for k in ("inspected", "passed", "review", "flagged", "defect_rate")]
    rows += [{"metric": k, "value": metrics.get(k)} for k in METRIC_KEYS if metrics and k in metrics]
    return rows


def flagged_table(qa: dict) -> list[dict]:
    return [{k: p.get(k) for k in ("product_id", "run", "max_score", "flagged_cameras", "label")}
            for p in qa["flagged_products"]] or [{"product_id": "(none flagged)"}]


def publish_run(qa: dict, metrics: dict | None) -> list[str]:
    """Create the three artifacts of one evaluate / score run; returns their keys."""
    kind, line = qa["kind"], qa["line"]
    keys = [artifact_key(kind, line, p) for p in ("summary", "metrics", "flagged")]
    create_markdown_artifact(summary_markdown(qa), key=keys[0], description=f"{kind} run: QA summary")
    create_table_artifact(metrics_table(metrics, qa), key=keys[1], description=f"{kind} run: metrics")
    create_table_artifact(flagged_table(qa), key=keys[2], description=f"{kind} run: flagged products")
    return keys


def _active_fraction() -> float | None:
    """Progress of the innermost running tqdm bar with a total (the library's long loops use tqdm)."""
    from tqdm import tqdm

    bars = [b for b in list(getattr(tqdm, "_instances", [])) if getattr(b, "total", None)]
    if not bars:
        return None
    bar = max(bars, key=lambda b: getattr(b, "pos", 0))
    return min(100.0, 100.0 * bar.n / bar.total)


@contextlib.contextmanager
def progress_artifact(stage: str, line: str, every_s: float = 5.0) -> Iterator[str]:
    """A progress artifact for a stage, updated from its tqdm bars every ``every_s`` seconds and set to
    100 at the end; the library stays unaware of Prefect."""
    key = artifact_key(stage, line, "progress")
    art = create_progress_artifact(0.0, key=key, description=f"{stage} stage progress")
    stop = threading.Event()

    def poll():
        last = 0.0
        while not stop.wait(every_s):
            frac = _active_fraction()
            if frac is not None and frac != last:
                with contextlib.suppress(Exception):      # the UI missing an update must not fail the stage
                    update_progress_artifact(art, frac, description=f"{stage}: {frac:.0f}% of the current step")
                last = frac

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield key
    finally:
        stop.set()
        thread.join(timeout=every_s + 1)
    update_progress_artifact(art, 100.0, description=f"{stage}: done")
