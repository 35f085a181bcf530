"""The two heads through train -> threshold -> evaluate on tiny generated images with ground-truth masks:
image (DifferNet-style), conv (fully convolutional: maps, pixel AUROC, boxes) and both."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from defectflow import evaluate, threshold, train
from defectflow.config import ParamsError, params_from_dict
from defectflow.manifest import SCORES, SYNTH, read_manifest, write_manifest
from defectflow.scoring import (CONV_FILE, CONV_HEAD_FILE, FUSION_FILE, HEADS, MODEL_FILE, ModelError, load_heads,
                                score_items, score_with_maps)

TRAIN = {"image_size": 64, "scales": [1.0], "n_coupling_blocks": 2, "hidden": 32, "epochs": 6,
         "batch_size": 16, "lr": 1e-3, "n_transforms": 2, "n_transforms_test": 2, "threads": 1,
         "conv": {"levels": [0, 1], "merge": [], "hidden_ratio": 1.0, "n_blocks": 2, "epochs": 4, "batch_size": 8}}


def _params(**train_kw):
    return params_from_dict({"seed": 1, "train": {**TRAIN, **train_kw}, "evaluate": {"bootstrap": 50}})


def _texture(rng, size=64):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 120 + 35 * np.sin(xx / 3.0 + rng.uniform(0, 6.3)) * np.cos(yy / 4.0)
    img = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=2) + rng.normal(0, 5, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root, n_train=16, n_val=6, n_test_good=4, n_test_defect=4, seed=0):
    """Textures; defective test images get a red disc, drawn also into a ground-truth mask."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, label, n in (("train", "good", n_train), ("val", "good", n_val), ("test", "good", n_test_good),
                            ("test", "defect", n_test_defect)):
        for i in range(n):
            img = _texture(rng)
            mask_path = None
            if label == "defect":
                cx, cy = (int(v) for v in rng.integers(16, 48, 2))
                cv2.circle(img, (cx, cy), 8, (20, 20, 230), thickness=-1)
                mask = np.zeros(img.shape[:2], np.uint8)
                cv2.circle(mask, (cx, cy), 8, 255, thickness=-1)
                mask_path = root / "gt" / f"{split}_{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(mask_path), mask)
                mask_path = mask_path.as_posix()
            path = root / split / f"{label}_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), img)
            pid = f"{split}-{label}-{i}"
            rows.append({"item_id": pid, "product_id": pid, "run": "r0", "camera": "cam0", "split": split,
                         "label": label, "defect_type": "disc" if label == "defect" else None,
                         "image_path": path.as_posix(), "gt_mask_path": mask_path, "source": "images",
                         "is_center": True, "synthetic": False})
    write_manifest(pd.DataFrame(rows), SYNTH, root / "synth" / "manifest.parquet")
    return root / "synth"


def _stages(params, inp, root):
    train.run(params, inp, root / "model")
    threshold.run(params, inp, root / "model", root / "threshold.json", root / "val.parquet")
    evaluate.run(params, inp, root / "model", root / "threshold.json", root / "reports")
    return (json.loads((root / "threshold.json").read_text()),
            json.loads((root / "reports" / "metrics.json").read_text()))


@pytest.fixture(scope="module", autouse=True)
def _cache(private_cache):
    """Every test here uses a private cache (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make_dataset(root)


@pytest.fixture(scope="module")
def both(data, tmp_path_factory):
    _, inp = data
    root = tmp_path_factory.mktemp("both")
    params = _params(head="both", score_from="image")
    thr, metrics = _stages(params, inp, root)
    return root, inp, params, thr, metrics


def test_head_both_trains_both_heads_in_one_folder(both):
    root, _, _, _, _ = both
    assert (root / "model" / MODEL_FILE).is_file() and (root / "model" / CONV_FILE).is_file()
    card = json.loads((root / "model" / "card.json").read_text())
    assert card["heads"] == ["image", "conv"] and card["scored_by"] == "image"
    assert card["best_epoch"] >= 1 and card["n_train_images"] == 16            # image head fields as before
    conv = card["conv"]
    assert conv["n_train_images"] == 16 and len(conv["best_epoch"]) == 2 and conv["model_mb"] > 0
    assert conv["features"]["levels"] == [0, 1] and conv["features"]["strides"] == [8, 16]
    loss = pd.read_csv(root / "model" / "conv_loss.csv")
    assert list(loss.columns) == ["epoch", "level", "train_nll", "val_nll"] and len(loss) == 4 * 2
    # the patch memory: 16 images x 8 x 8 cells = 1024 training patches, fewer than train.conv.memory: all kept
    assert (root / "model" / "memory.npy").is_file()
    assert conv["memory"]["patches"] == conv["memory"]["of"] == 1024 and conv["memory"]["dim"] > 0
    heads = load_heads(root / "model")
    assert heads.names == ("image", "conv")


def test_head_both_threshold_fits_a_map_threshold(both):
    root, _, _, thr, _ = both
    assert thr["score_from"] == "image" and thr["heads"] == ["image", "conv"]
    conv = thr["conv"]
    assert "lowest map maximum" in conv["rule"] and "conformal" in conv["rule"] and conv["vmin"] < conv["map_threshold"] < conv["vmax"]
    val = read_manifest(root / "val.parquet", SCORES)
    assert np.allclose(val["score"], val["score_image"]) and val["score_conv"].notna().all()
    assert val["map_area"].between(0, 1).all() and val["n_boxes"].notna().all()


def test_head_both_evaluate_gives_pixel_auroc_boxes_and_overlays(both):
    root, _, _, thr, m = both
    rep = root / "reports"
    assert m["pixel_auroc"] is not None and m["pixel_auroc"] > 0.8
    assert m["score_from"] == "image" and set(m["heads"]) == {"image", "conv"}
    assert m["heads"]["image"]["image_auroc"] == m["image_auroc"]
    assert m["heads"]["conv"]["image_auroc"] >= 0.75
    assert set(m["per_defect_type"]) == {"disc"} and m["map_threshold"] == thr["conv"]["map_threshold"]
    boxes = pd.read_parquet(rep / "boxes.parquet")
    assert list(boxes.columns) == list(evaluate.BOX_COLUMNS) and len(boxes) == m["n_boxes"]
    scores = read_manifest(rep / "scores.parquet", SCORES)
    flagged = set(scores.loc[scores.pred_defect, "item_id"])
    assert set(boxes["item_id"]) <= flagged
    assert ((boxes.x0 < boxes.x1) & (boxes.y0 < boxes.y1) & (boxes.x1 <= 64) & (boxes.y1 <= 64)).all()
    assert scores["score_conv"].notna().all() and scores["map_mean"].notna().all()
    html = (rep / "report.html").read_text()
    assert "pixel_auroc" in html and "http" not in html
    if m["n_products_flagged"]:
        assert "heat map + boxes" in html and "anomaly map\" src=\"data:image/jpeg;base64," in html


def test_score_from_conv_uses_the_map_score(both, tmp_path):
    root, inp, _, _, _ = both
    params = _params(head="both", score_from="conv")
    threshold.run(params, inp, root / "model", tmp_path / "t.json", tmp_path / "v.parquet")
    thr = json.loads((tmp_path / "t.json").read_text())
    assert thr["score_from"] == "conv" and "conformal" in thr["conv"]["rule"]
    evaluate.run(params, inp, root / "model", tmp_path / "t.json", tmp_path / "rep")
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["image_auroc"] == m["heads"]["conv"]["image_auroc"] and m["score_from"] == "conv"
    scores = read_manifest(tmp_path / "rep" / "scores.parquet", SCORES)
    assert np.allclose(scores["score"], scores["score_conv"])
    # boxes are drawn on flagged images only
    boxes = pd.read_parquet(tmp_path / "rep" / "boxes.parquet")
    assert set(boxes.item_id) <= set(scores.loc[scores.pred_defect, "item_id"])
    # a threshold fitted on the other head's scores is refused
    with pytest.raises(evaluate.EvaluateError, match="rerun threshold"):
        evaluate.run(params, inp, root / "model", root / "threshold.json", tmp_path / "rep2")


def test_fused_score_is_the_weighted_mean_of_standardised_head_scores(both, tmp_path):
    root, inp, _, _, _ = both
    fusion = json.loads((root / "model" / FUSION_FILE).read_text())
    card = json.loads((root / "model" / "card.json").read_text())
    assert set(fusion["heads"]) == {"image", "conv"} and card["fusion"] == fusion
    assert fusion["heads"]["image"]["n"] == card["n_val_standardise"] == 2 and "never test" in fusion["source"]
    split = json.loads((root / "model" / "val_split.json").read_text())
    params = _params(head="both", score_from="fused")
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    got = score_items(df[df.split == "test"], root / "model", params)
    w = params.train.image_weight
    assert w != 0.5 and fusion["weights"] == pytest.approx({"image": w, "conv": 1 - w})   # recorded
    z = {h: (got[HEADS[h]] - v["mean"]) / v["std"] for h, v in fusion["heads"].items()}
    assert np.allclose(got["score"], w * z["image"] + (1 - w) * z["conv"])
    unweighted = tmp_path / "unweighted"                               # folders written before weights: equal
    unweighted.mkdir()
    for f in (root / "model").iterdir():
        (unweighted / f.name).write_bytes(f.read_bytes())
    (unweighted / FUSION_FILE).write_text(json.dumps({k: v for k, v in fusion.items() if k != "weights"}))
    got_eq = score_items(df[df.split == "test"], unweighted, params)
    assert np.allclose(got_eq["score"], (z["image"] + z["conv"]) / 2)
    # the stats come from the standardisation part of the good val images: their fused scores are centred on 0
    std_rows = df[df.item_id.isin(split["standardise"])]
    assert abs(score_items(std_rows, root / "model", params)["score"].mean()) < 1e-6
    threshold.run(params, inp, root / "model", tmp_path / "t.json", tmp_path / "v.parquet")
    evaluate.run(params, inp, root / "model", tmp_path / "t.json", tmp_path / "rep")
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["score_from"] == "fused" and m["image_auroc"] >= 0.75
    assert any("fusion.json" in n for n in m["notes"])
    # a model folder from before fusion: a clear error naming the file to retrain for
    old = tmp_path / "old"
    old.mkdir()
    for f in (root / "model").iterdir():
        if f.name != FUSION_FILE:
            (old / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelError, match="no fusion.json"):
        score_items(df[df.split == "test"], old, params)


def _verified_reference(conv, maps, nll, share, border):
    """The conv image score with a patch memory, written out: PatchCore patch features (3 x 3 reflected average,
    coarse level resized), the ``share`` highest inner cells of the unblurred map (at least 4), their largest
    distance to the memory."""
    import torch
    import torch.nn.functional as F
    from scipy.spatial.distance import cdist

    from defectflow.anomaly_maps import cell_map
    cells = cell_map(nll)
    n, h, w = cells.shape
    feats = []
    for m in maps:
        t = F.avg_pool2d(F.pad(torch.from_numpy(m), (1, 1, 1, 1), mode="reflect"), 3, stride=1)
        feats.append(F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False).numpy())
    feats = np.concatenate(feats, axis=1)
    k = min((h - 2 * border) * (w - 2 * border), max(4, round(share * (h - 2 * border) * (w - 2 * border))))
    out = []
    for i in range(n):
        inner = cells[i, border:h - border, border:w - border]
        top = np.argsort(-inner.ravel())[:k]
        ys, xs = np.unravel_index(top, inner.shape)
        q = feats[i][:, ys + border, xs + border].T
        out.append(cdist(q, conv.memory.bank).min(axis=1).max())
    return np.array(out)


def test_both_heads_share_one_backbone_pass_and_onnx_equals_torch(both):
    """The conv head's scores from the shared pass (ONNX Runtime) equal a separate torch pass."""
    root, inp, params, _, _ = both
    assert (root / "model" / CONV_HEAD_FILE).is_file()
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    test = df[df.split == "test"]
    heads = load_heads(root / "model")
    assert heads.shares_pass(params)
    shared, amaps = score_with_maps(test, root / "model", params, model=heads, keep_maps=True)
    from defectflow.anomaly_maps import anomaly_maps
    conv = heads.conv
    maps = conv.extractor(params).extract(test["image_path"].tolist())
    nll = conv.nll_maps(maps, backend="torch")
    ref = anomaly_maps(nll, (64, 64), params.maps.sigma)
    np.testing.assert_allclose(amaps, ref, rtol=1e-4, atol=1e-4)
    want = _verified_reference(conv, maps, nll, params.maps.verify_share, params.maps.border)
    np.testing.assert_allclose(shared["score_conv"], want, rtol=1e-4)
    alone = score_items(test, root / "model", _params(head="image"), model=heads.image)
    np.testing.assert_allclose(shared["score_image"], alone["score_image"], rtol=1e-5)


def test_map_levels_choose_the_shown_map_and_the_conv_score(both):
    """maps.levels: the shown map (heat maps, boxes, pixel AUROC) and score_conv from those levels' groups."""
    root, inp, params, _, _ = both
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    test = df[df.split == "test"]
    fine = params.model_copy(update={"maps": params.maps.model_copy(update={"levels": (0,)})})
    a, amaps_all = score_with_maps(test, root / "model", params, keep_maps=True)
    b, amaps_fine = score_with_maps(test, root / "model", fine, keep_maps=True)
    assert not np.allclose(amaps_all, amaps_fine)
    from defectflow.anomaly_maps import anomaly_maps, cell_scores
    heads = load_heads(root / "model")
    nll = heads.conv.nll_maps(heads.conv.extractor(params).extract(test["image_path"].tolist()))
    np.testing.assert_allclose(amaps_fine, anomaly_maps(nll[:1], (64, 64), params.maps.sigma), rtol=1e-4, atol=1e-4)
    maps = heads.conv.extractor(params).extract(test["image_path"].tolist())
    want = _verified_reference(heads.conv, maps, nll[:1], params.maps.verify_share, params.maps.border)
    np.testing.assert_allclose(b["score_conv"], want, rtol=1e-4)
    no_memory = params.model_copy(update={"maps": params.maps.model_copy(update={"levels": (0,), "score": "max"})})
    heads.conv.memory = None                                   # without a memory: the cells' maximum
    c = score_items(test, root / "model", no_memory, model=heads)
    np.testing.assert_allclose(c["score_conv"], cell_scores(nll[:1], "max", border=params.maps.border), rtol=1e-4)
    from defectflow.export import export_model, onnx_scores
    from defectflow.features import _resize, load_image
    out = export_model(root / "model", root / "fine.onnx", fine)
    imgs = np.stack([_resize(load_image(p), 64) for p in test.image_path])
    np.testing.assert_allclose(onnx_scores(out, imgs, output="anomaly_map"), amaps_fine, rtol=1e-4, atol=1e-4)
    with pytest.raises(ParamsError, match="subset of train.conv.levels"):
        params_from_dict({"train": {"conv": {"levels": [0, 1]}}, "maps": {"levels": [2]}})
    two = params_from_dict({"train": {**TRAIN, "conv": {"levels": [0, 2]}}, "maps": {"levels": [2]}})
    with pytest.raises(ModelError, match="maps.levels"):
        score_items(test, root / "model", two)


def test_head_image_still_works_without_maps(data, tmp_path):
    _, inp = data
    thr, m = _stages(_params(head="image", score_from="conv"), inp, tmp_path)   # score_from ignored: one head
    assert not (tmp_path / "model" / CONV_FILE).exists() and thr["conv"] is None and thr["score_from"] == "image"
    assert m["image_auroc"] is not None and m["pixel_auroc"] is None and m["heads"].keys() == {"image"}
    assert any("no conv head" in n for n in m["notes"])
    assert pd.read_parquet(tmp_path / "reports" / "boxes.parquet").empty


def test_head_conv_alone(data, tmp_path):
    _, inp = data
    params = _params(head="conv", conv={**TRAIN["conv"], "memory": 0})
    thr, m = _stages(params, inp, tmp_path)
    assert not (tmp_path / "model" / MODEL_FILE).exists() and (tmp_path / "model" / "train_loss.csv").is_file()
    assert not (tmp_path / "model" / "memory.npy").exists()     # memory 0: the conv score is the map's maximum
    from defectflow.anomaly_maps import cell_scores
    heads = load_heads(tmp_path / "model")
    test = read_manifest(inp / "manifest.parquet", SYNTH).query("split == 'test'")
    nll = heads.conv.nll_maps(heads.conv.extractor(params).extract(test["image_path"].tolist()))
    np.testing.assert_allclose(score_items(test, tmp_path / "model", params)["score_conv"],
                               cell_scores(nll, "max", border=params.maps.border), rtol=1e-4)
    assert thr["score_from"] == "conv" and m["pixel_auroc"] is not None and m["heads"].keys() == {"conv"}
    # a folder with one head scores with it, whatever score_from says (as train.head conv / image do)
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    got = score_items(df[df.split == "test"], tmp_path / "model", _params(head="both", score_from="image"))
    assert np.allclose(got["score"], got["score_conv"]) and "score_image" not in got
    with pytest.raises(ModelError, match="no model found"):
        load_heads(tmp_path / "nothing")


def test_conv_params_are_validated():
    with pytest.raises(ParamsError, match="train.conv"):
        params_from_dict({"train": {"conv": {"levels": [0, 5]}}})
    with pytest.raises(ParamsError, match="train.head"):
        params_from_dict({"train": {"head": "pixel"}})
    with pytest.raises(ParamsError, match="maps.score"):
        params_from_dict({"maps": {"score": "median"}})
    p = params_from_dict({})
    assert p.train.head == "both" and p.train.heads == ("image", "conv")


def test_gradient_maps_explain_the_image_head(data, tmp_path):
    """DifferNet's gradient maps: the torch score they differentiate is the pipeline's image score,
    nudging the pixels where the map is high moves the score far more than where it is low, and the
    report shows them (image head alone: no conv heat map)."""
    import torch

    from defectflow.anomaly_maps import load_rgb
    from defectflow.gradient_maps import GradientMapper
    from defectflow.scoring import load_model

    _, inp = data
    params = params_from_dict({"seed": 1, "train": {**TRAIN, "head": "image"},
                               "evaluate": {"bootstrap": 50, "gradient_maps": True}})
    _stages(params, inp, tmp_path)
    html = (tmp_path / "reports" / "report.html").read_text()
    assert ">gradient map</div>" in html and 'anomaly map" src="data:image/jpeg;base64,' in html
    test = read_manifest(inp / "manifest.parquet", SYNTH).query("split == 'test'")
    mapper = GradientMapper(load_model(tmp_path / "model"), params)
    images = np.stack([load_rgb(p, 64) for p in test.image_path])
    with torch.no_grad():
        np.testing.assert_allclose(mapper.score(torch.from_numpy(images)).numpy(),
                                   score_items(test, tmp_path / "model", params)["score_image"], rtol=1e-3)
    maps = mapper.maps(list(images))
    assert maps.shape == (len(images), 64, 64) and np.isfinite(maps).all() and (maps >= 0).all()
    x = torch.from_numpy(images[-1:]).requires_grad_(True)
    base = mapper.score(x)
    base.sum().backward()
    step = 0.02 * torch.sign(x.grad)
    with torch.no_grad():
        def moved(region):
            mask = torch.from_numpy(region[None, :, :, None].astype(np.float32))
            return float(mapper.score(x + step * mask) - base)
        high = moved(maps[-1] >= np.quantile(maps[-1], 0.95))
        low = moved(maps[-1] <= np.quantile(maps[-1], 0.05))
    assert high > 0 and high > 3 * abs(low)


def test_merged_patch_groups_score_the_same_in_onnx_runtime_torch_and_the_export(data, tmp_path):
    """The default conv head: levels 0 and 1 merged into patch features (3 x 3 local average), level 2
    alone, tempered training; the pipeline (ONNX Runtime), torch and the exported graph agree."""
    _, inp = data
    conv = {**TRAIN["conv"], "levels": [0, 1, 2], "merge": [0, 1], "local_average": 3, "temper": 0.1}
    params = params_from_dict({"seed": 1, "train": {**TRAIN, "head": "both", "score_from": "fused", "conv": conv},
                               "maps": {"levels": [0, 1]}, "evaluate": {"bootstrap": 20}})
    thr, m = _stages(params, inp, tmp_path)
    heads = load_heads(tmp_path / "model")
    assert heads.conv.groups == [(0, 1), (2,)] and heads.conv.map_levels(params) == [0]
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert len(card["conv"]["best_epoch"]) == 2
    loss = pd.read_csv(tmp_path / "model" / "conv_loss.csv")
    assert sorted(loss["level"].astype(str).unique()) == ["0+1", "2"]
    df = read_manifest(inp / "manifest.parquet", SYNTH)
    test = df[df.split == "test"]
    shared, amaps = score_with_maps(test, tmp_path / "model", params, model=heads, keep_maps=True)
    from defectflow.anomaly_maps import anomaly_maps
    nll = heads.conv.nll_maps(heads.conv.extractor(params).extract(test["image_path"].tolist()), backend="torch")
    assert [a.shape[1:] for a in nll] == [(8, 8), (2, 2)]
    np.testing.assert_allclose(amaps, anomaly_maps(nll[:1], (64, 64), params.maps.sigma), rtol=1e-4, atol=1e-4)
    from defectflow.export import export_model, onnx_scores
    from defectflow.features import _resize, load_image
    out = export_model(tmp_path / "model", tmp_path / "model.onnx", params)
    imgs = np.stack([_resize(load_image(p), 64) for p in test.image_path])
    np.testing.assert_allclose(onnx_scores(out, imgs), shared["score"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(onnx_scores(out, imgs, output="anomaly_map"), amaps, rtol=1e-4, atol=1e-4)
    assert m["image_auroc"] >= 0.75
