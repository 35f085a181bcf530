"""Backbone registry, weights resolution, image loading and ONNX-vs-torch feature parity."""
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
    assert bb.list_backbones() == ["alexnet", "efficientnet_lite0", "squeezenet1_1"]
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
