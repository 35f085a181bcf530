"""The fully convolutional density model: invertibility, exact log-dets, per-position NLL,
training behaviour, seeding, persistence and ONNX export."""
import math

import numpy as np
import pytest
import torch

from defectflow.density.conv import (ChannelPermutation, ConvCoupling, ConvFitError, ConvFlow, Standardize2d,
                                     export_onnx, load_conv_flow, save_conv_flow)
from defectflow.density.conv_fit import ConvFitConfig, fit_conv_flow


def _randomise(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Non-zero parameters everywhere (couplings start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _std_block() -> Standardize2d:
    b = Standardize2d(4)
    b.set_stats(torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.5, 2.0, 1.0, 3.0]))
    return b


@pytest.mark.parametrize("make", [lambda: ConvCoupling(5, 6, 3, 1.5), lambda: ConvCoupling(4, 6, 1, 2.0),
                                  lambda: ConvCoupling(5, 6, 3, 1.5, "separable"),
                                  lambda: ConvCoupling(5, 6, 1, 1.5, clamp_kind="tanh"),
                                  lambda: ChannelPermutation(7, seed=3), _std_block])
def test_blocks_invert_and_logdet_maps_cancel(make):
    block = make()
    _randomise(block)
    block = block.double()
    if isinstance(block, ConvCoupling):
        channels = block.c1 + block.c2
    elif isinstance(block, ChannelPermutation):
        channels = len(block.perm)
    else:
        channels = block.channels
    x = torch.randn(3, channels, 5, 6, dtype=torch.float64)
    y, ld = block(x)
    x2, ld_rev = block(y, rev=True)
    assert ld.shape == (3, 5, 6)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ld_rev, -ld, atol=1e-10, rtol=1e-10)


def _tiny_model(subnet: str = "dense", clamp_kind: str = "atan") -> ConvFlow:
    m = ConvFlow([3, 4], n_blocks=3, hidden_ratio=2.0, clamp=2.0, seed=1, kernels=(3, 1), subnet=subnet,
                 clamp_kind=clamp_kind)
    m.set_stats([torch.tensor([0.1, -0.2, 0.3]), torch.zeros(4)],
                [torch.tensor([0.5, 1.5, 2.0]), torch.linspace(0.5, 2.0, 4)])
    _randomise(m, scale=0.3)
    return m.double().eval()


def test_model_inverse_is_identity():
    m = _tiny_model()
    xs = [torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)]
    zs = [lv(x)[0] for lv, x in zip(m.levels, xs)]
    for x, x2 in zip(xs, m.inverse(zs)):
        torch.testing.assert_close(x2, x, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("subnet,clamp_kind", [("dense", "atan"), ("separable", "atan"), ("dense", "tanh")])
def test_log_likelihood_map_sums_to_exact_density_numerical_jacobian(subnet, clamp_kind):
    """Sum over positions of the log p map == log N(z; 0, I) + log|det dz/dx| with the full Jacobian
    of the whole map (3x3 convs couple neighbouring positions, so this checks the split is exact)."""
    m = _tiny_model(subnet, clamp_kind)
    level = m.levels[0]
    shape = (1, 3, 3, 3)
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: level(v.reshape(shape))[0].reshape(-1), x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    z, ld_map = level(x)
    assert ld_map.sum().item() == pytest.approx(logabs.item(), abs=1e-8)
    d = z.numel()
    log_normal = -0.5 * (z ** 2).sum() - 0.5 * d * math.log(2 * math.pi)
    ll_map = level.log_likelihood_map(x)
    assert ll_map.shape == (1, 3, 3)
    assert ll_map.sum().item() == pytest.approx((log_normal + logabs).item(), abs=1e-8)


def test_untrained_model_is_standard_normal_of_standardised_input():
    """Couplings start as the identity: log p = log N((x - mean) / std) - sum log std per position."""
    m = ConvFlow([2], n_blocks=2, seed=0)
    m.set_stats([torch.tensor([1.0, 2.0])], [torch.tensor([2.0, 0.5])])
    x = torch.randn(1, 2, 3, 3)
    z = (x - torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)) / torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    want = -0.5 * (z ** 2).sum(1) - math.log(2 * math.pi) - math.log(2.0 * 0.5)
    torch.testing.assert_close(m.log_likelihood_maps([x])[0], want, atol=1e-5, rtol=1e-5)


def _toy_maps(n: int, seed: int, c: int = 4, hw: int = 8) -> np.ndarray:
    """Correlated channels (a rank-2 structure plus small noise), smooth over space."""
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.5], [0.8, -1.0], [-0.6, 0.9], [0.3, 0.2]])[:c]
    lat = rng.normal(size=(n, 2, hw, hw))
    x = np.einsum("cl,nlhw->nchw", mix, lat) + 0.05 * rng.normal(size=(n, c, hw, hw))
    return x.astype(np.float32)


CFG = ConvFitConfig(n_blocks=2, hidden_ratio=4.0, epochs=12, batch_size=8, lr=3e-3, seed=0, threads=1)


@pytest.fixture(scope="module")
def toy_fit():
    train = _toy_maps(48, 0)
    val = _toy_maps(12, 1)
    return train, val, fit_conv_flow([train], [val], CFG)


def test_training_lowers_nll_and_selects_by_validation(toy_fit):
    _, _, res = toy_fit
    tr = [h["train_nll"][0] for h in res.history]
    va = [h["val_nll"][0] for h in res.history]
    assert tr[-1] < tr[0] - 0.3
    assert res.best_epoch[0] == int(np.argmin(va)) + 1
    assert res.best_val_nll[0] == pytest.approx(min(va))
    # the kept model is the best-validation one
    nll = -(res.model.log_likelihood_maps([toy_fit[1]])[0] / 4).mean().item()
    assert nll == pytest.approx(min(va), abs=1e-5)


def test_anomalous_patch_scores_higher(toy_fit):
    _, _, res = toy_fit
    x = _toy_maps(4, 7)
    x[:, :, 2:4, 5:7] = np.array([2.0, 2.0, 2.0, -2.0]).reshape(1, 4, 1, 1)   # off the learnt correlations
    nll = res.model.nll_per_dim_maps([x])[0].numpy()
    assert nll.shape == (4, 8, 8)
    patch = nll[:, 2:4, 5:7].min(axis=(1, 2))
    normal = np.delete(nll.reshape(4, -1), [2 * 8 + 5, 2 * 8 + 6, 3 * 8 + 5, 3 * 8 + 6], axis=1)
    assert (patch > np.quantile(normal, 0.99, axis=1)).all()


def test_same_seed_same_scores_other_seed_differs():
    train, val = _toy_maps(16, 0), _toy_maps(4, 1)
    cfg = ConvFitConfig(n_blocks=2, hidden_ratio=2.0, epochs=2, batch_size=8, seed=3, threads=1)
    a = fit_conv_flow([train], [val], cfg).model.log_likelihood_maps([val])[0]
    b = fit_conv_flow([train], [val], cfg).model.log_likelihood_maps([val])[0]
    c = fit_conv_flow([train], [val], ConvFitConfig(**{**cfg.__dict__, "seed": 4})).model.log_likelihood_maps([val])[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_fit_rejects_bad_inputs():
    with pytest.raises(ConvFitError, match="at least 2"):
        fit_conv_flow([np.zeros((1, 4, 3, 3), np.float32)])
    bad = np.zeros((4, 4, 3, 3), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ConvFitError, match="NaN"):
        fit_conv_flow([bad])
    with pytest.raises(ConvFitError, match="shape"):
        fit_conv_flow([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="level 0 expects"):
        ConvFlow([4]).log_likelihood_maps([torch.zeros(1, 5, 2, 2)])


def test_save_load_roundtrip_weights_only(tmp_path, toy_fit):
    _, val, res = toy_fit
    path = save_conv_flow(tmp_path / "conv.pt", res.model, {"levels": [0]})
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["config"]["channels"] == [4]
    model, meta = load_conv_flow(path)
    assert meta == {"levels": [0]}
    torch.testing.assert_close(model.log_likelihood_maps([val])[0], res.model.log_likelihood_maps([val])[0])
    assert payload["config"]["clamp_kind"] == "tanh"          # what fit_conv_flow trains by default
    del payload["config"]["subnet"], payload["config"]["clamp_kind"]   # a file from before both options
    torch.save(payload, tmp_path / "old.pt")
    old = load_conv_flow(tmp_path / "old.pt")[0].config
    assert (old.subnet, old.clamp_kind) == ("dense", "atan")
    with pytest.raises(ValueError, match="atan or tanh"):
        ConvCoupling(4, 4, 1, clamp_kind="sigmoid")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ConvFitError, match="junk.pt"):
        load_conv_flow(tmp_path / "junk.pt")


@pytest.mark.parametrize("subnet,kernels", [("dense", (3, 1)), ("separable", (3, 1)), ("dense", (1,))])
def test_onnx_export_matches_torch(tmp_path, subnet, kernels):
    ort = pytest.importorskip("onnxruntime")
    m = ConvFlow([6, 8], n_blocks=2, hidden_ratio=1.0, seed=0, subnet=subnet, kernels=kernels)
    _randomise(m, scale=0.2)
    m.eval()
    path = export_onnx(m, tmp_path / "conv.onnx", sizes=[(8, 8), (4, 4)])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, (h, w) in ((3, (8, 8)), (2, (10, 6))):     # dynamic batch and spatial size
        maps = [torch.randn(n, 6, h, w), torch.randn(n, 8, h // 2, w // 2)]
        want = m.log_likelihood_maps(maps)
        got = sess.run(None, {"map0": maps[0].numpy(), "map1": maps[1].numpy()})
        for g, t in zip(got, want):
            assert g.shape == tuple(t.shape)
            np.testing.assert_allclose(g, t.numpy(), rtol=1e-4, atol=1e-4 * float(t.abs().max()))


def test_patch_groups_merge_levels_on_the_finest_grid_with_a_local_average():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    m = ConvFlow.for_inputs([3, 5], groups=((0, 1),), local_average=3, n_blocks=1)
    assert m.channels == (8,) and m.config.inputs == (3, 5)
    ((pa, pb),) = m.prepare([a, b])
    assert pa.shape == (2, 3, 8, 8) and pb.shape == (2, 5, 4, 4)
    g = m.levels[0].combine([pa, pb])
    assert g.shape == (2, 8, 8, 8)
    # an interior position is the 3 x 3 mean of level 0 there; level 1 is upsampled after its own average
    torch.testing.assert_close(g[:, :3, 4, 4], a[:, :, 3:6, 3:6].mean(dim=(2, 3)))
    flat = torch.full((1, 3, 6, 6), 2.0)
    ((h,),) = ConvFlow.for_inputs([3], local_average=3, n_blocks=1).prepare([flat])
    torch.testing.assert_close(h, flat)          # reflected borders: a constant map stays constant
    payload = m.to_payload()
    again = ConvFlow.from_payload(payload)
    assert again.config.groups == ((0, 1),) and again.config.local_average == 3
    with pytest.raises(ValueError, match="do not give"):
        ConvFlow([7], in_channels=[3, 5], groups=[(0, 1)])


@pytest.mark.parametrize("mode", ["concat", "context"])
def test_onnx_export_of_merged_groups_matches_torch(tmp_path, mode):
    ort = pytest.importorskip("onnxruntime")
    m = ConvFlow.for_inputs([6, 8, 4], groups=((0, 1), (2,)), local_average=3, n_blocks=2, hidden_ratio=1.0,
                            kernels=(1,), merge_mode=mode, context_channels=5)
    _randomise(m, scale=0.2)
    m.eval()
    path = export_onnx(m, tmp_path / "conv.onnx", sizes=[(8, 8), (4, 4), (2, 2)])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, (h, w) in ((3, (8, 8)), (2, (12, 8))):
        maps = [torch.randn(n, 6, h, w), torch.randn(n, 8, h // 2, w // 2), torch.randn(n, 4, h // 4, w // 4)]
        want = m.log_likelihood_maps(maps)
        got = sess.run(None, {"map0": maps[0].numpy(), "map1": maps[1].numpy(), "map2": maps[2].numpy()})
        assert [g.shape for g in got] == [tuple(t.shape) for t in want] == [(n, h, w), (n, h // 4, w // 4)]
        for g, t in zip(got, want):
            np.testing.assert_allclose(g, t.numpy(), rtol=1e-4, atol=1e-4 * float(t.abs().max()))


def test_context_group_is_the_joint_of_a_conditional_and_the_coarse_density():
    """merge_mode context: log p(fine, coarse) = log p(fine | context) + log p(coarse), the coarse term upsampled;
    with the couplings at the identity both parts are standard normals of the standardised maps."""
    m = ConvFlow.for_inputs([3, 5], groups=((0, 1),), local_average=1, n_blocks=2, merge_mode="context",
                            context_channels=4)
    assert m.channels == (8,)
    a, b = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 3, 3)
    (ll,) = m.log_likelihood_maps([a, b])
    std = -0.5 * math.log(2 * math.pi)
    fine = (-0.5 * a ** 2 + std).sum(dim=1)
    coarse = torch.nn.functional.interpolate((-0.5 * b ** 2 + std).sum(dim=1)[:, None], size=(6, 6), mode="bilinear",
                                             align_corners=False)[:, 0]
    torch.testing.assert_close(ll, fine + coarse)
    _randomise(m, scale=0.3)
    ll2 = m.log_likelihood_maps([a, b])[0]
    b2 = b.clone()
    b2[:, :, 0, 0] += 3.0                    # the context changes the fine term, not only the coarse one
    cond = m.levels[0].context(m.levels[0].context_std(b)[0])
    cond2 = m.levels[0].context(m.levels[0].context_std(b2)[0])
    assert not torch.allclose(cond, cond2) and not torch.allclose(ll2, m.log_likelihood_maps([a, b2])[0])
    with pytest.raises(ValueError, match="at most two levels"):
        ConvFlow.for_inputs([3, 5, 2], groups=((0, 1, 2),), merge_mode="context")


def _two_mode_maps(n: int, seed: int, rare: float = 0.05, offset: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A common pattern everywhere but on a few positions, which hold a rare but normal one."""
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.normal(size=(n, 4, 8, 8))
    mask = rng.random((n, 1, 8, 8)) < rare
    shift = offset * np.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 4, 1, 1)
    return np.where(mask, x + shift, x).astype(np.float32), mask[:, 0]


def test_tempering_moves_capacity_to_rare_normal_patches():
    """Plain maximum likelihood leaves a rare normal pattern with a high NLL; p^-beta weights lower it against
    the common pattern's, and a patch unlike both still scores far above it."""
    train, _ = _two_mode_maps(60, 0)
    test, rare = _two_mode_maps(20, 1)
    anomaly = test.copy()
    anomaly[:, :, 3, 3] = np.array([1.5, 1.5, -1.5, -1.5])
    gaps = {}
    for beta in (0.0, 0.5):
        cfg = ConvFitConfig(n_blocks=4, hidden_ratio=4.0, kernels=(1,), epochs=16, batch_size=10, lr=3e-3, seed=0,
                            threads=1, temper=beta)
        model = fit_conv_flow([train], None, cfg).model
        nll = model.nll_per_dim_maps([test])[0].numpy()
        gaps[beta] = float(np.median(nll[rare]) - np.median(nll[~rare]))
        bad = model.nll_per_dim_maps([anomaly])[0].numpy()[:, 3, 3]
        assert np.median(bad) > 2 * np.quantile(nll[rare], 0.9)
    assert 0 < gaps[0.5] < 0.93 * gaps[0.0]
