"""Train -> threshold -> evaluate on a tiny generated image set, the threshold / verdict logic, the
feature cache, bad inputs, the validation split, the bootstrap CI, the ONNX head and the export."""
import json
import logging

import cv2
import numpy as np
import pandas as pd
import pytest

import torch

from defectflow import evaluate, threshold, train
from defectflow.export import FullScorer, export_model, onnx_scores
from defectflow.features import FeatureExtractor, load_image
from defectflow.fsutil import ImageReadError
from defectflow.config import params_from_dict
from defectflow.manifest import SCORES, SYNTH, VERDICTS, read_manifest, write_manifest
from defectflow.scoring import load_model, product_verdicts, score_items, score_with_maps
from defectflow.threshold import ThresholdError, fit_threshold

TRAIN = {"image_size": 64, "scales": [1.0, 0.5], "n_coupling_blocks": 2, "hidden": 64, "epochs": 12,
         "batch_size": 16, "lr": 1e-3, "n_transforms": 2, "n_transforms_test": 2, "threads": 1}


def _params(**threshold_kw):
    return params_from_dict({"seed": 3, "train": TRAIN, "threshold": threshold_kw or {}})


# ------------------------------------------------------------------ tiny data set
def _texture(rng: np.random.Generator, size: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    base = 130 + 40 * np.sin(xx / 3.0 + phase) * np.cos(yy / 5.0)
    img = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=2) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img.copy()
    cx, cy = (int(v) for v in rng.integers(20, 60, 2))
    cv2.circle(img, (cx, cy), 14, (20, 20, 230), thickness=-1)
    cv2.line(img, (5, int(rng.integers(5, 75))), (75, int(rng.integers(5, 75))), (255, 255, 255), 3)
    return img


def make_dataset(root, n_train=20, n_val=4, n_test_good=4, n_test_defect=4, val_defects=0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []

    def add(split, label, i, defect_type=None, **extra):
        img = _texture(rng)
        if label == "defect":
            img = _defect(img, rng)
        path = root / split / f"{label}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)
        pid = f"{split}-{label}-{i}"
        rows.append({"item_id": pid, "product_id": pid, "run": "r0", "camera": "cam0", "split": split,
                     "label": label, "defect_type": defect_type, "image_path": path.as_posix(),
                     "source": "images", "is_center": True, "synthetic": False, **extra})

    for i in range(n_train):
        add("train", "good", i)
    for i in range(n_val):
        add("val", "good", i)
    for i in range(val_defects):
        add("val", "defect", i, "blob")
    for i in range(n_test_good):
        add("test", "good", i)
    for i in range(n_test_defect):
        add("test", "defect", i, "blob" if i % 2 else "scratch")
    df = pd.DataFrame(rows)
    write_manifest(df, SYNTH, root / "synth" / "manifest.parquet")
    return root / "synth", df


@pytest.fixture(scope="module", autouse=True)
def _onnx_cache(private_cache):
    """Every test here uses a private cache (tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    inp, df = make_dataset(root, n_val=6)
    params = _params()
    train.run(params, inp, root / "model")
    threshold.run(params, inp, root / "model", root / "threshold.json", root / "val_scores.parquet")
    evaluate.run(params, inp, root / "model", root / "threshold.json", root / "reports")
    return root, inp, params


# ------------------------------------------------------------------ end to end
def test_train_writes_model_card_and_loss_curve(pipeline):
    root, _, _ = pipeline
    card = json.loads((root / "model" / "card.json").read_text())
    assert card["n_train_images"] == 20 and card["n_val_images"] == 6
    assert card["params"]["train"]["hidden"] == 64 and card["features"]["feature_dim"] == 944
    loss = pd.read_csv(root / "model" / "train_loss.csv")
    assert list(loss.columns) == ["epoch", "train_nll", "val_nll"] and 1 <= len(loss) <= TRAIN["epochs"]
    # early stopping: the run ends `patience` epochs after the best, or at the epoch limit
    assert len(loss) == min(TRAIN["epochs"], card["best_epoch"] + 5) == card["epochs_run"]
    assert loss["train_nll"].iloc[-1] < loss["train_nll"].iloc[0]
    model = load_model(root / "model")
    assert model.density.dim == 944 and model.features["backbone"] == "efficientnet_lite0"


def test_threshold_holds_a_false_alarm_rate_from_disjoint_calibration_images(pipeline):
    root, _, _ = pipeline
    info = json.loads((root / "threshold.json").read_text())
    assert info["method"] == "target_fpr" and info["method_used"] == "target_fpr"
    # 6 good val images: 1 picked the epoch, 2 standardised the heads, 3 calibrate the threshold:
    # too few for a 5% rate, and the note says how many it needs
    assert info["val"]["n_good"] == 3 and info["val"]["n_defect"] == 0
    assert "too few" in info["note"] and "at least 19" in info["note"]
    assert info["conformal"]["enough"] is False and info["threshold"] == max(info["calibration_good_scores"])
    split = json.loads((root / "model" / "val_split.json").read_text())
    assert [len(split[k]) for k in ("select", "standardise", "calibrate")] == [1, 2, 3]
    parts = [set(split[k]) for k in ("select", "standardise", "calibrate")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    fusion = json.loads((root / "model" / "fusion.json").read_text())
    assert [v["n"] for v in fusion["heads"].values()] == [2, 2]
    val = read_manifest(root / "val_scores.parquet", SCORES)
    assert sorted(val["item_id"]) == split["calibrate"] and val["score"].notna().all()
    b = info["bands"]
    assert b["low"] <= info["threshold"] <= b["high"] and b["high"] >= info["val"]["good_scores"]["max"]


def test_evaluate_writes_metrics_plots_and_report(pipeline):
    root, _, _ = pipeline
    rep = root / "reports"
    m = json.loads((rep / "metrics.json").read_text())
    assert m["image_auroc"] is not None and m["image_auroc"] >= 0.9
    assert m["n_test"] == 8 and m["n_defect"] == 4 and set(m["per_defect_type"]) == {"blob", "scratch"}
    for key in ("accuracy", "precision", "recall", "f1", "product_accuracy"):
        assert key in m
    lo, hi = m["image_auroc_ci"]
    assert 0 <= lo <= m["image_auroc"] <= hi <= 1
    counts = m["bands"]["test_counts"]
    assert sum(counts["good"].values()) == 4 and sum(counts["defect"].values()) == 4
    scores = read_manifest(rep / "scores.parquet", SCORES)
    assert scores.loc[scores.label == "defect", "score"].mean() > scores.loc[scores.label == "good", "score"].mean()
    verdicts = read_manifest(rep / "verdicts.parquet", VERDICTS)
    assert len(verdicts) == 8
    roc = pd.read_csv(rep / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    hist = pd.read_csv(rep / "scores_hist.csv")
    assert list(hist.columns) == ["score", "count", "good", "defect", "unknown"] and hist["count"].sum() == 8
    html = (rep / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html
    assert "Operator bands" in html and "False alarms" in html and "too few" in html
    assert (rep / "roc.png").stat().st_size > 1000 and (rep / "scores_hist.png").is_file()
    # QA's first screen, then the detail; the PDF of the same page; the run in the history
    assert html.index("products inspected") < html.index("Flagged products") < html.index("Metrics (test images)")
    qa = json.loads((rep / "qa.json").read_text())
    assert qa["inspected"] == 8 and qa["passed"] + qa["review"] + qa["flagged"] == 8
    assert qa["flagged"] == m["n_products_flagged"] and len(qa["flagged_products"]) == qa["flagged"]
    assert qa["card"]["model_version"] and qa["card"]["params_hash"] and qa["card"]["data_hash"]
    assert "Threshold policy and model card" in html and "Defect families" in html and "Split sizes" in html
    assert "font-family: system-ui, 'DejaVu Sans'" in html        # the style sheet is not HTML-escaped
    assert qa["families"]["n"] >= 4 and len(qa["families"]["members"]) == qa["families"]["n"]   # region features
    assert 'alt="families scatter"' in html and 'alt="family 1 example"' in html
    assert (rep / "report.pdf").read_bytes()[:5] == b"%PDF-"
    history = [json.loads(x) for x in (root / "data/history/runs.jsonl").read_text().splitlines()]
    assert history[-1]["kind"] == "evaluate" and history[-1]["inspected"] == 8
    pr = pd.read_csv(rep / "pr.csv")
    assert list(pr.columns) == ["recall", "precision", "threshold"] and pr["precision"].between(0, 1).all()
    conf = pd.read_csv(rep / "confusion.csv")
    assert len(conf) == 8 and int(((conf.actual == "defect") & (conf.predicted == "defect")).sum()) == m["tp"]


def test_same_seed_same_scores(pipeline, tmp_path):
    root, inp, params = pipeline
    train.run(params, inp, tmp_path / "model")
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    test = df[df.split == "test"]
    a = score_items(test, root / "model", params)["score"].to_numpy()
    b = score_items(test, tmp_path / "model", params)["score"].to_numpy()
    np.testing.assert_array_equal(a, b)


def test_single_class_test_set_gives_null_auroc(pipeline, tmp_path):
    root, inp, params = pipeline
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    df = df[df.label == "good"]
    write_manifest(df, SYNTH, tmp_path / "in" / "manifest.parquet")
    evaluate.run(params, tmp_path / "in", root / "model", root / "threshold.json", tmp_path / "rep")
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["image_auroc"] is None and any("one class" in n for n in m["notes"])


def test_empty_good_train_set_is_a_clear_error(tmp_path):
    inp, df = make_dataset(tmp_path, n_train=0, n_val=2, n_test_good=1, n_test_defect=1)
    with pytest.raises(train.TrainError, match="no good training images"):
        train.run(_params(), inp, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_threshold_stage_needs_two_good_validation_images(pipeline, tmp_path):
    root, inp, params = pipeline
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    df = df[(df.split != "val") | (df.item_id == "val-good-0")]
    write_manifest(df, SYNTH, tmp_path / "in" / "manifest.parquet")
    with pytest.raises(ThresholdError, match=r"[01] good calibration image"):
        threshold.run(params, tmp_path / "in", root / "model", tmp_path / "t.json", tmp_path / "v.parquet")
    assert not (tmp_path / "t.json").exists()


def test_threshold_stage_uses_defective_validation_images(pipeline, tmp_path):
    root, _, _ = pipeline
    inp, _ = make_dataset(tmp_path, n_train=0, n_val=4, n_test_good=0, n_test_defect=0, val_defects=3, seed=5)
    for method in ("target_tpr", "f1"):
        params = _params(method=method, target_tpr=0.6)
        threshold.run(params, inp, root / "model", tmp_path / "t.json", tmp_path / "v.parquet")
        info = json.loads((tmp_path / "t.json").read_text())
        assert info["method_used"] == method and info["val"]["n_defect"] == 3 and info["note"] == ""
        assert info["val"]["tpr"] >= 0.6 and info["val"]["auroc"] is not None


def test_histogram_keeps_good_scores_readable_when_outliers_are_huge():
    scores = np.r_[np.linspace(0, 1, 20), 5e9]
    labels = ["good"] * 20 + ["defect"]
    hist = evaluate.histogram_table(scores, labels, threshold=0.9)
    assert hist["count"].sum() == 21 and hist["defect"].iloc[-1] == 1
    assert hist["score"].max() < 5                    # bins span the good scores, not 5e9


# ------------------------------------------------------------------ threshold logic
def test_target_tpr_picks_the_min_fpr_threshold():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.35, 0.6, 0.7, 0.8]
    labels = ["good"] * 5 + ["defect"] * 4
    fit = fit_threshold(scores, labels, "target_tpr", target_tpr=0.75)
    # TPR >= 0.75 needs 3 of 4 defects: t = 0.6 (FPR 0) reaches it; t = 0.35 would flag 2 goods
    assert fit["threshold"] == 0.6 and fit["fpr"] == 0.0 and fit["tpr"] == 0.75
    fit = fit_threshold(scores, labels, "target_tpr", target_tpr=1.0)
    assert fit["threshold"] == 0.35 and fit["tpr"] == 1.0 and fit["fpr"] == 0.4
    assert fit["method_used"] == "target_tpr"


def test_f1_threshold():
    scores = [0.1, 0.2, 0.3, 0.9, 0.25, 0.8, 0.85]
    labels = ["good", "good", "good", "good", "defect", "defect", "defect"]
    fit = fit_threshold(scores, labels, "f1")
    # t = 0.25: tp 3, fp 2, fn 0 -> F1 0.75; t = 0.8: tp 2, fp 1, fn 1 -> 0.67; t = 0.3: 0.57
    assert fit["threshold"] == 0.25 and fit["method_used"] == "f1" and fit["tpr"] == 1.0


def test_target_fpr_without_defects_and_unknown_ignored():
    scores = np.linspace(0, 1, 101)
    labels = ["good"] * 101
    fit = fit_threshold(np.r_[scores, 5.0], labels + ["unknown"], "target_tpr", target_fpr=0.05)
    # target_tpr needs defects: the conformal rule, k = ceil(102 * 0.95) = 97th lowest score
    assert fit["method_used"] == "target_fpr" and "no defective images" in fit["note"]
    assert fit["threshold"] == pytest.approx(0.96) and fit["conformal"]["k"] == 97
    assert fit["fpr"] == pytest.approx(5 / 101) and fit["n_defect"] == 0


def test_too_few_good_validation_images():
    with pytest.raises(ThresholdError, match="at least 2 good"):
        fit_threshold([0.5, 0.9], ["good", "defect"])


def test_product_verdicts_any_camera_flags():
    df = pd.DataFrame({
        "product_id": ["p1", "p1", "p2", "p2", "p3"], "run": "r", "split": "test",
        "camera": ["cam0", "cam1", "cam0", "cam1", "cam0"],
        "label": ["good", "defect", "good", "good", "unknown"],
        "score": [0.1, 0.9, 0.2, 0.3, 0.95],
    })
    v = product_verdicts(df, threshold=0.5).set_index("product_id")
    assert list(v.columns) == [c for c in VERDICTS.names if c != "product_id"]
    assert v.loc["p1", "verdict"] == "defect" and v.loc["p1", "flagged_cameras"] == "cam1"
    assert v.loc["p1", "label"] == "defect" and v.loc["p1", "n_cameras"] == 2
    assert v.loc["p2", "verdict"] == "good" and v.loc["p2", "flagged_cameras"] == ""
    assert v.loc["p3", "label"] == "unknown" and v.loc["p3", "max_score"] == 0.95


# ------------------------------------------------------------------ features, inputs, split, export
def _pngs(folder, n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"{i}.png"
        cv2.imwrite(str(p), (rng.random((size, size, 3)) * 255).astype(np.uint8))
        out.append(p)
    return out


def test_feature_cache_hits_on_content_and_separates_settings(tmp_path, monkeypatch):
    paths = _pngs(tmp_path, 3)
    fx = FeatureExtractor("efficientnet_lite0", image_size=32, threads=1, cache=tmp_path / "c")
    a = fx.extract(paths, 2)
    calls = []
    real = fx.features
    monkeypatch.setattr(fx, "features", lambda imgs, t: calls.append(len(imgs)) or real(imgs, t))
    b = fx.extract(paths, 2)
    assert calls == [] and np.array_equal(a, b)            # all from the cache: backbone not run
    # a copy under another name is the same content: a hit; a changed file is a miss
    (tmp_path / "copy.png").write_bytes(paths[0].read_bytes())
    img = cv2.imread(str(paths[1]))
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(str(paths[1]), img)
    fx.extract([tmp_path / "copy.png", paths[1]], 2)
    assert calls == [1]
    # another transform count is another cache key; use_cache=False never touches it
    assert fx.cache_for(2).key != fx.cache_for(4).key
    keys = {p.name for p in (tmp_path / "c" / "features").iterdir()}
    fx.extract(paths, 1, use_cache=False)
    assert {p.name for p in (tmp_path / "c" / "features").iterdir()} == keys
    info = json.loads((tmp_path / "c" / "features" / fx.cache_for(2).key / "key.json").read_text())
    assert info["weights_id"] == fx.weights_id and info["n_transforms"] == 2


def test_gray_rgba_16bit_are_converted_with_a_log_line(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((20, 20), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 20, 4), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "w.png"), np.full((20, 20), 40000, np.uint16))
    fx = FeatureExtractor("efficientnet_lite0", image_size=32, threads=1, feature_cache=False)
    with caplog.at_level(logging.INFO, logger="defectflow"):
        feats = fx.extract([tmp_path / n for n in ("g.png", "a.png", "w.png")], 1)
    assert np.isfinite(feats).all()
    text = caplog.text
    assert "converted 1 grayscale image" in text and "converted 1 rgba image" in text
    assert "converted 1 grayscale+16-bit image" in text
    assert np.allclose(load_image(tmp_path / "w.png"), 40000 / 65535)


def test_truncated_images_stop_with_the_path_or_are_skipped(tmp_path):
    paths = _pngs(tmp_path, 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    ok, jpg = cv2.imencode(".jpg", np.full((30, 30, 3), 90, np.uint8))
    bad_jpg = tmp_path / "t.jpg"
    bad_jpg.write_bytes(jpg.tobytes()[:-40])
    for bad in (paths[1], bad_jpg):
        with pytest.raises(ImageReadError, match="truncated") as err:
            load_image(bad)
        assert str(bad) in str(err.value)
    fx = FeatureExtractor("efficientnet_lite0", image_size=32, threads=1, feature_cache=False)
    with pytest.raises(ImageReadError, match=str(paths[1])):
        fx.extract(paths, 1)
    feats = fx.extract(paths + [bad_jpg], 1, on_bad_image="skip")
    assert np.isnan(feats[1]).all() and np.isnan(feats[3]).all() and np.isfinite(feats[[0, 2]]).all()
    assert [p for p, _ in fx.skipped] == [str(paths[1]), str(bad_jpg)]


def test_train_skips_and_lists_bad_images_when_told(tmp_path):
    inp, df = make_dataset(tmp_path, n_train=8, n_val=5, n_test_good=0, n_test_defect=0)
    bad = df[df.split == "train"].image_path.iloc[2]
    with open(bad, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ImageReadError, match=bad):
        train.run(_params(), inp, tmp_path / "m1")
    params = _params().model_copy(update={"train": _params().train.model_copy(update={"on_bad_image": "skip"})})
    train.run(params, inp, tmp_path / "m2")
    card = json.loads((tmp_path / "m2" / "card.json").read_text())
    assert card["n_train_images"] == 7 and [s["path"] for s in card["skipped_images"]] == [bad]


def test_validation_split_too_small_is_a_clear_error(tmp_path):
    inp, _ = make_dataset(tmp_path, n_train=6, n_val=2, n_test_good=0, n_test_defect=0)
    with pytest.raises(train.TrainError, match="need at least 5"):
        train.run(_params(), inp, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_split_validation_is_seeded_and_order_independent(tmp_path):
    _, df = make_dataset(tmp_path, n_train=0, n_val=10, n_test_good=0, n_test_defect=0)
    a = train.split_validation(df, 7, 0.3, "val_split", standardise_fraction=0.2)
    b = train.split_validation(df.iloc[::-1], 7, 0.3, "val_split", standardise_fraction=0.2)
    assert [list(p.item_id) for p in a] == [list(p.item_id) for p in b] and [len(p) for p in a] == [3, 2, 5]
    assert len(set().union(*(set(p.item_id) for p in a))) == 10
    sel, std, cal = train.split_validation(df, 7, 0.5, "last_epoch")
    assert sel.empty and std.empty and len(cal) == 10


def test_bootstrap_ci_contains_the_auroc_and_is_seeded():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, bool), np.ones(30, bool)]
    s = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 30)]
    ci = evaluate.bootstrap_auroc_ci(y, s, 500, seed=1)
    from sklearn.metrics import roc_auc_score
    assert ci[0] < roc_auc_score(y, s) < ci[1] and ci[1] - ci[0] < 0.3
    assert ci == evaluate.bootstrap_auroc_ci(y, s, 500, seed=1)
    assert evaluate.bootstrap_auroc_ci(np.zeros(5, bool), s[:5]) is None


def test_onnx_head_equals_torch_head(pipeline):
    root, inp, params = pipeline
    model = load_model(root / "model")
    feats = np.random.default_rng(0).normal(size=(5, 2, model.density.in_dim)).astype(np.float32)
    onnx = model.score_features(feats, backend="onnx")
    torch_ = model.score_features(feats, backend="torch")
    np.testing.assert_allclose(onnx, torch_, rtol=1e-4, atol=1e-5)


def test_export_one_onnx_model_scores_as_the_pipeline(pipeline, tmp_path):
    """Every output of the exported graph equals the pipeline: fused score, each head's score, the map."""
    root, inp, params = pipeline
    out = export_model(root / "model", tmp_path / "model.onnx", params)
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    test = df[df.split == "test"]
    scored, amaps = score_with_maps(test, root / "model", params, keep_maps=True)
    from defectflow.features import _resize
    imgs = np.stack([_resize(load_image(p), params.train.image_size) for p in test.image_path])
    # relative 1e-4 of the score's magnitude (floored at 1: scores are NLL per dim or z-scores, they cross 0)
    for name in ("score", "score_image", "score_conv"):
        expected = scored[name].to_numpy()
        got = onnx_scores(out, imgs, output=name)
        assert np.all(np.abs(got - expected) <= 1e-4 * np.maximum(np.abs(expected), 1.0)), name
    np.testing.assert_allclose(onnx_scores(out, imgs, output="anomaly_map"), amaps, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        direct = FullScorer(load_model(root / "model"), params.train.n_transforms_test)(torch.from_numpy(imgs))[0]
    expected = scored["score_image"].to_numpy()
    assert np.all(np.abs(direct.numpy() - expected) <= 1e-4 * np.maximum(np.abs(expected), 1.0))


def test_export_cli(pipeline, tmp_path, capsys):
    from defectflow.cli import main
    root, _, params = pipeline
    (tmp_path / "p.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    assert main(["export", "--model", str(root / "model"), "--out", str(tmp_path / "m.onnx"),
                 "--params", str(tmp_path / "p.yaml")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1e6 and "score" in capsys.readouterr().out


def test_train_image_size_auto_is_resolved_and_recorded_with_the_model(tmp_path):
    inp, df = make_dataset(tmp_path, n_train=8, n_val=5, n_test_good=2, n_test_defect=0)
    params = params_from_dict({"seed": 3, "train": {**TRAIN, "image_size": "auto", "head": "image", "epochs": 2,
                                                    "scales": [1.0], "n_transforms": 1, "n_transforms_test": 1}})
    train.run(params, inp, tmp_path / "model")
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["features"]["image_size"] == 224           # 80 px images: the floor of auto
    got = score_items(df[df.split == "test"], tmp_path / "model", params)
    assert len(got) == 2 and got["score"].notna().all()


def test_score_run_report_has_no_label_based_parts(pipeline, tmp_path):
    from defectflow.reporting.score_run import score_and_report

    root, inp, params = pipeline
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    new = df[df.split == "test"].assign(label="unknown", defect_type=None)
    thr = json.loads((root / "threshold.json").read_text())
    scored, verdicts, qa, _ = score_and_report(params, new, root / "model", thr, inp / "manifest.parquet",
                                               tmp_path / "report", history_file=tmp_path / "runs.jsonl")
    assert qa["kind"] == "score" and qa["inspected"] == len(verdicts) == 8
    assert qa["flagged"] == int((verdicts.verdict == "defect").sum())
    html = (tmp_path / "report" / "report.html").read_text()
    assert "products inspected" in html and "Metrics (test images)" not in html and "Worst false alarms" not in html
    # every camera of each flagged product shown has its heat map (scored again: the parts keep no maps)
    assert qa["flagged"] >= 1 and html.count("anomaly map\" src=") == len(scored[scored.product_id.isin(
        verdicts[verdicts.verdict == "defect"].product_id)].drop_duplicates(["product_id", "camera"]))
    assert (tmp_path / "report" / "report.pdf").is_file()
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])["kind"] == "score"


def test_score_run_in_parts_gives_the_scores_of_one_pass_whatever_runs_the_parts(pipeline, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from defectflow.reporting.score_run import centre_rows, merge_scored, score_and_report, score_part
    from defectflow.units.chunks import row_parts

    root, inp, params = pipeline
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    new = df[df.split == "test"].assign(label="unknown", defect_type=None)
    thr = json.loads((root / "threshold.json").read_text())
    map_thr = thr["conv"]["map_threshold"] if thr.get("conv") else None
    centre = centre_rows(new)
    parts = row_parts(centre, 3)
    assert [len(x) for x in parts] == [3, 3, 2]
    cut = thr["threshold"]
    serial = merge_scored([score_part(params, x, root / "model", map_thr, cut) for x in parts])
    with ThreadPoolExecutor(2) as pool:                 # as the threads runner: parts at once, any order
        threaded = merge_scored(list(pool.map(lambda x: score_part(params, x, root / "model", map_thr, cut), parts)))
    pd.testing.assert_frame_equal(serial[0], threaded[0])
    whole = score_part(params, centre, root / "model", map_thr, cut)          # one pass (batch of 8)
    # ONNX Runtime's kernels sum in a batch-size-dependent order: 1e-4-relative differences across batch sizes
    np.testing.assert_allclose(serial[0]["score"], whole[0]["score"], rtol=1e-3, atol=1e-4)
    assert list(serial[0].index) == list(whole[0].index) == list(range(8))
    assert serial[0]["pred_defect"].tolist() == (serial[0]["score"] >= cut).tolist()
    # the parts keep no maps, only the flagged views' boxes: those of one pass with every map kept
    from defectflow.evaluate import flagged_boxes
    from defectflow.scoring import score_with_maps
    full, amaps = score_with_maps(centre, root / "model", params, keep_maps=True, map_threshold=map_thr)
    full["pred_defect"] = full["score"] >= cut
    expected = flagged_boxes(full, amaps, map_thr, params)
    assert serial[1] is not None and len(expected) > 0
    pd.testing.assert_frame_equal(serial[1], threaded[1])
    pd.testing.assert_frame_equal(serial[1].drop(columns="score"), expected.drop(columns="score"), check_dtype=False)
    np.testing.assert_allclose(serial[1]["score"], expected["score"], rtol=1e-5)
    calls = []

    def scorer(rows, mt, cut_):
        calls.append(len(rows))
        return serial
    scored, verdicts, qa, _ = score_and_report(params, new, root / "model", thr, inp / "manifest.parquet",
                                               tmp_path / "report", history_file=tmp_path / "runs.jsonl", scorer=scorer)
    assert calls == [8] and qa["inspected"] == len(verdicts) == 8
    np.testing.assert_array_equal(scored["score"], serial[0]["score"])
    with pytest.raises(ValueError, match="no scored parts"):
        merge_scored([])


def test_family_features_read_in_chunks_equal_one_pass_and_skip_unreadable(pipeline, tmp_path):
    from defectflow.reporting.families import item_features

    root, inp, params = pipeline
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    flagged = df[df.split == "test"]["image_path"].tolist()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    flagged.insert(3, str(bad))
    passed = df[df.split == "val"]["image_path"].tolist()
    whole, ok_whole = item_features(flagged, passed, root / "model", params)
    parts, ok_parts = item_features(flagged, passed, root / "model", params, chunk=3)
    assert ok_whole.tolist() == ok_parts.tolist() and not ok_whole[3] and ok_whole.sum() == len(flagged) - 1
    assert whole.shape == (len(flagged) - 1, parts.shape[1]) and np.allclose(whole, parts, atol=1e-5)
