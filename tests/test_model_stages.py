"""Train -> threshold -> evaluate on a tiny generated image set, and the threshold / verdict logic."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow import evaluate, threshold, train
from defectflow.config import params_from_dict
from defectflow.manifest import SCORES, SYNTH, VERDICTS, read_manifest, write_manifest
from defectflow.scoring import load_model, product_verdicts, score_items
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
def _onnx_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DEFECTFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    inp, df = make_dataset(root)
    params = _params()
    train.run(params, inp, root / "model")
    threshold.run(params, inp, root / "model", root / "threshold.json", root / "val_scores.parquet")
    evaluate.run(params, inp, root / "model", root / "threshold.json", root / "reports")
    return root, inp, params


# ------------------------------------------------------------------ end to end
def test_train_writes_model_card_and_loss_curve(pipeline):
    root, _, _ = pipeline
    card = json.loads((root / "model" / "card.json").read_text())
    assert card["n_train_images"] == 20 and card["n_val_images"] == 4
    assert card["params"]["train"]["hidden"] == 64 and card["features"]["feature_dim"] == 944
    loss = pd.read_csv(root / "model" / "train_loss.csv")
    assert list(loss.columns) == ["epoch", "train_nll", "val_nll"] and len(loss) == TRAIN["epochs"]
    assert loss["train_nll"].iloc[-1] < loss["train_nll"].iloc[0]
    model = load_model(root / "model")
    assert model.density.dim == 944 and model.features["backbone"] == "efficientnet_lite0"


def test_threshold_falls_back_without_defective_validation_images(pipeline):
    root, _, _ = pipeline
    info = json.loads((root / "threshold.json").read_text())
    assert info["method"] == "target_tpr" and info["method_used"] == "fallback_fpr"
    assert "no defective images" in info["note"]
    assert info["val"]["n_good"] == 4 and info["val"]["n_defect"] == 0
    val = read_manifest(root / "val_scores.parquet", SCORES)
    assert len(val) == 4 and val["score"].notna().all()


def test_evaluate_writes_metrics_plots_and_report(pipeline):
    root, _, _ = pipeline
    rep = root / "reports"
    m = json.loads((rep / "metrics.json").read_text())
    assert m["image_auroc"] is not None and m["image_auroc"] >= 0.9
    assert m["n_test"] == 8 and m["n_defect"] == 4 and set(m["per_defect_type"]) == {"blob", "scratch"}
    for key in ("accuracy", "precision", "recall", "f1", "product_accuracy"):
        assert key in m
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
    assert (rep / "roc.png").stat().st_size > 1000 and (rep / "scores_hist.png").is_file()


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
    with pytest.raises(ThresholdError, match="1 good validation image"):
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


def test_fallback_quantile_without_defects_and_unknown_ignored():
    scores = np.linspace(0, 1, 101)
    labels = ["good"] * 101
    fit = fit_threshold(np.r_[scores, 5.0], labels + ["unknown"], "target_tpr", fallback_fpr=0.05)
    assert fit["method_used"] == "fallback_fpr" and fit["threshold"] == pytest.approx(0.95)
    assert fit["fpr"] == pytest.approx(0.05, abs=0.01) and fit["n_defect"] == 0


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
