"""Prefect artifacts of a run: stable keys per line, QA's summary, metrics and flagged products."""
import pytest

import tasks.artifacts as art


def _qa():
    return {"kind": "evaluate", "line": "line-2", "threshold": 1.5, "inspected": 3, "passed": 1, "review": 1,
            "flagged": 1, "defect_rate": 1 / 3,
            "per_run": [{"run": "r1", "inspected": 3, "passed": 1, "review": 1, "flagged": 1, "defect_rate": 1 / 3}],
            "per_camera": [{"camera": "cam0", "inspected": 3, "passed": 1, "review": 1, "flagged": 1}],
            "card": {"model_version": "abc123", "params_hash": "p1", "data_hash": "d1", "git_commit": "g1"},
            "families": {"k": 2, "n": 5, "ari": 0.5},
            "flagged_products": [{"product_id": "r1-p002", "run": "r1", "max_score": 3.2, "flagged_cameras": "cam0",
                                  "label": "defect"}]}


def test_keys_are_stable_and_checked():
    assert art.artifact_key("evaluate", "line-2", "summary") == "evaluate-line-2-summary"
    with pytest.raises(ValueError, match="lowercase"):
        art.artifact_key("evaluate", "line_2", "summary")


def test_publish_run_creates_summary_metrics_and_flagged(monkeypatch):
    made = {}
    monkeypatch.setattr(art, "create_markdown_artifact", lambda md, key, description: made.setdefault(key, md))
    monkeypatch.setattr(art, "create_table_artifact", lambda table, key, description: made.setdefault(key, table))
    keys = art.publish_run(_qa(), {"image_auroc": 0.91, "threshold": 1.5, "unrelated": 1})
    assert keys == ["evaluate-line-2-summary", "evaluate-line-2-metrics", "evaluate-line-2-flagged"]
    md = made["evaluate-line-2-summary"]
    assert "**3** products inspected" in md and "**1** sent to review" in md and "33.3%" in md
    assert "| cam0 | 3 | 1 | 1 | 1 |" in md and "`abc123`" in md and "adjusted Rand index 0.500" in md
    metrics = {r["metric"]: r["value"] for r in made["evaluate-line-2-metrics"]}
    assert metrics["image_auroc"] == 0.91 and metrics["flagged"] == 1 and "unrelated" not in metrics
    assert made["evaluate-line-2-flagged"][0]["product_id"] == "r1-p002"


def test_progress_follows_the_running_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    updates = []
    monkeypatch.setattr(art, "create_progress_artifact", lambda p, key, description: "id")
    monkeypatch.setattr(art, "update_progress_artifact", lambda a, p, description: updates.append(p))
    import time
    with art.progress_artifact("train", "line-1", every_s=0.05):
        with tqdm(total=4, disable=False) as bar:
            bar.update(2)
            time.sleep(0.3)
    assert 50.0 in updates and updates[-1] == 100.0
