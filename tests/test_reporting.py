"""The report's parts on small made-up inputs: QA counts, history, families, comparison, galleries."""
import json

import numpy as np
import pandas as pd
import pytest

from defectflow.reporting import families as fam
from defectflow.reporting.gallery import comparison, false_alarms, missed_defects
from defectflow.reporting.plots import confusion_table, pr_table
from defectflow.reporting.summary import HistoryError, append_history, dispositions, history_entry, qa_summary


def _verdicts():
    return pd.DataFrame({"product_id": ["a", "b", "c", "d"], "run": ["r1", "r1", "r2", "r2"],
                         "max_score": [0.1, 0.6, 2.0, 0.9], "verdict": ["good", "good", "defect", "defect"],
                         "label": ["good", "good", "defect", "good"]})


def test_dispositions_split_passed_review_flagged():
    d = dispositions(_verdicts(), review_low=0.5)
    assert list(d) == ["passed", "review", "flagged", "flagged"]
    assert list(dispositions(_verdicts(), None)) == ["passed", "passed", "flagged", "flagged"]


def test_qa_summary_counts_per_run_and_camera():
    scored = pd.DataFrame({"product_id": ["a", "a", "b", "c", "c", "d"],
                           "camera": ["c0", "c1", "c0", "c0", "c1", "c1"],
                           "score": [0.1, 0.2, 0.6, 0.3, 2.0, 0.9]})
    qa = qa_summary(_verdicts(), scored, threshold=0.8, review_low=0.5)
    assert (qa["inspected"], qa["passed"], qa["review"], qa["flagged"]) == (4, 1, 1, 2)
    assert qa["defect_rate"] == 0.5
    assert {r["run"]: r["flagged"] for r in qa["per_run"]} == {"r1": 0, "r2": 2}
    cams = {r["camera"]: r for r in qa["per_camera"]}
    assert (cams["c0"]["inspected"], cams["c0"]["review"], cams["c0"]["flagged"]) == (3, 1, 0)
    assert (cams["c1"]["inspected"], cams["c1"]["flagged"]) == (3, 2)


def test_history_appends_and_names_a_bad_line(tmp_path):
    path = tmp_path / "h" / "runs.jsonl"
    qa = qa_summary(_verdicts(), pd.DataFrame(columns=["product_id", "camera", "score"]), 0.8, None)
    runs = append_history(path, history_entry("evaluate", qa, model_version="m1"))
    runs = append_history(path, history_entry("score", qa, model_version="m1"))
    assert [r["kind"] for r in runs] == ["evaluate", "score"] and runs[1]["flagged"] == 2
    assert len(path.read_text().splitlines()) == 2
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(HistoryError, match=r"runs.jsonl:3"):
        append_history(path, history_entry("score", qa, model_version="m1"))
    assert len(path.read_text().splitlines()) == 3          # nothing written after the bad line was found


def test_families_find_separated_groups_and_choose_k_by_silhouette():
    rng = np.random.default_rng(0)
    good = rng.normal(0, 1, (60, 20))
    centres = rng.normal(0, 6, (3, 20))
    truth = np.repeat([0, 1, 2], 8)
    flagged = centres[truth] + rng.normal(0, 0.5, (24, 20))
    res = fam.cluster_families(flagged, good, seed=0)
    assert res.k == 3 and set(res.silhouettes) == set(range(2, 9))
    assert fam.adjusted_rand(truth, res.labels) == pytest.approx(1.0)
    assert res.xy.shape == (24, 2)
    assert fam.cluster_families(flagged[:3], good) is None
    assert fam.cluster_families(flagged, good, k=5, picture=False).k == 5


def test_comparison_lists_changed_verdicts_and_skips_the_same_model():
    v = _verdicts()
    prev = {"metrics": {"image_auroc": 0.8}, "model_version": "old",
            "verdicts": v.assign(verdict=["good", "defect", "defect", "good"])[["product_id", "verdict"]]}
    c = comparison(prev, {"image_auroc": 0.9}, v, "new")
    assert c["rows"][0] == {"name": "image_auroc", "before": 0.8, "after": 0.9}
    assert sorted(x["product_id"] for x in c["changed"]) == ["b", "d"]
    assert comparison(prev, {"image_auroc": 0.9}, v, "old") is None and comparison(None, {}, v, "x") is None


def test_galleries_order_false_alarms_and_misses(tmp_path):
    scored = pd.DataFrame({"product_id": list("abcd"), "camera": "c0", "image_path": str(tmp_path / "none.png"),
                           "label": ["good", "good", "defect", "defect"], "defect_type": [None, None, "x", "y"],
                           "score": [3.0, 5.0, 0.5, 0.2], "pred_defect": [True, True, False, False]})
    assert [t["product_id"] for t in false_alarms(scored, 5)] == ["b", "a"]
    assert [t["product_id"] for t in missed_defects(scored, 1)] == ["d"]
    assert false_alarms(scored, 5)[0]["img"] is None          # unreadable image: no thumbnail, no crash


def test_pr_and_confusion_tables():
    labels = ["good", "good", "defect", "defect", "unknown"]
    pr = pr_table([0.1, 0.4, 0.35, 0.8, 9.0], labels)
    assert pr["precision"].iloc[-1] == 1.0 and pr["recall"].max() == 1.0
    conf = confusion_table(labels, [False, True, True, True, True])
    assert len(conf) == 4 and json.loads(conf.to_json(orient="records"))[1] == {"actual": "good", "predicted": "defect"}
    assert pr_table([0.1, 0.2], ["good", "good"]).empty


def test_product_tiles_show_every_camera_crop_in_its_colours(tmp_path):
    import base64

    import cv2

    from defectflow.config import params_from_dict
    from defectflow.reporting.overlays import product_tiles

    rows = []
    for cam, value, score in (("cam1", 200, 0.3), ("cam0", 90, 2.0)):
        path = tmp_path / f"{cam}.png"
        cv2.imwrite(str(path), np.full((30, 30, 3), value, np.uint8))
        rows.append({"item_id": cam, "product_id": "p1", "camera": cam, "image_path": str(path), "score": score,
                     "pred_defect": score >= 1.0})
    verdicts = pd.DataFrame({"product_id": ["p1"], "max_score": [2.0], "verdict": ["defect"]})
    tiles, _ = product_tiles(pd.DataFrame(rows), verdicts, None, pd.DataFrame(columns=["item_id"]), None,
                             params_from_dict({}))
    assert [t["camera"] for t in tiles["p1"]] == ["cam0", "cam1"] and [t["flagged"] for t in tiles["p1"]] == [True, False]
    means = [cv2.imdecode(np.frombuffer(base64.b64decode(t["crop"]), np.uint8), cv2.IMREAD_COLOR).mean()
             for t in tiles["p1"]]
    assert abs(means[0] - 90) < 3 and abs(means[1] - 200) < 3


def test_region_features_group_by_the_kind_of_anomaly_not_its_place_or_strength():
    from defectflow.reporting.region_features import RegionReference, patch_grid, region_features

    rng = np.random.default_rng(1)
    kinds = rng.normal(0, 1, (2, 2, 12))                  # per kind: an offset of level 0 and of level 1
    looks = 4 * rng.normal(0, 1, (2, 2, 12))              # two looks of the whole item, normal ones too

    def maps(looked):
        out = [rng.normal(0, .5, (len(looked), 12, 8, 8)), rng.normal(0, .5, (len(looked), 12, 4, 4))]
        for level in (0, 1):
            out[level] += looks[looked, level][:, :, None, None]
        return [m.astype(np.float32) for m in out]

    truth = np.repeat([0, 1], 8)
    ref = maps(np.arange(30) % 2)
    flag = maps(np.arange(16) // 4 % 2)                  # looks cross the kinds
    for i, kind in enumerate(truth):
        y, x = (int(v) for v in rng.integers(0, 3, 2))      # a place on the 4 x 4 grid
        strength = rng.uniform(2, 4)                      # below the looks' difference
        flag[0][i, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2] += strength * kinds[kind, 0][:, None, None]
        flag[1][i, :, y, x] += strength * kinds[kind, 1]
    assert patch_grid(flag).shape == (16, 16, 24)
    feats = region_features(flag, ref)
    assert feats.shape == (16, 24) and np.allclose(np.linalg.norm(feats, axis=1), 1.0)
    res = fam.cluster_families(feats, None, seed=0, picture=False)
    assert fam.adjusted_rand(truth, res.labels) > 0.8
    assert fam.adjusted_rand(truth, fam.cluster_families(feats, None, seed=0, k=2, picture=False).labels) == 1.0
    # global pooled features of the same items group the looks, not the kinds
    pooled = np.concatenate([m.mean(axis=(2, 3)) for m in flag], axis=1)
    ref_pooled = np.concatenate([m.mean(axis=(2, 3)) for m in ref], axis=1)
    assert fam.adjusted_rand(truth, fam.cluster_families(pooled, ref_pooled, seed=0, k=2, picture=False).labels) < 0.3
    with pytest.raises(ValueError, match="passed"):
        region_features(flag, [m[:0] for m in ref])
    # the report reads flagged items in chunks against one reference: the same features
    reference = RegionReference(ref)
    chunked = np.concatenate([reference.features([m[a:a + 5] for m in flag]) for a in range(0, 16, 5)])
    assert np.allclose(chunked, feats, atol=1e-5)


def test_nearest_matches_brute_force_across_chunks():
    from defectflow.density.memory import PatchMemory

    rng = np.random.default_rng(2)
    q, bank = rng.normal(0, 1, (50, 6)), rng.normal(0, 1, (40, 6))
    full = np.linalg.norm(q[:, None] - bank[None], axis=2)
    dist, idx = PatchMemory(bank).nearest(q, block=7)
    assert (idx == full.argmin(1)).all() and np.allclose(dist, full.min(1), atol=1e-4)
