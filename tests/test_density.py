"""The density model: invertibility, exact log-dets, every NLL term, training behaviour."""
import math

import numpy as np
import pytest
import torch

from defectflow.density import (AffineCoupling, DensityModel, FitConfig, FixedPermutation, Standardize,
                                fit_density)


def _randomise(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Give every parameter non-zero values (coupling outputs start at zero: identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("block", [
    AffineCoupling(5, hidden=8, clamp=1.5),
    AffineCoupling(6, hidden=8, clamp=2.0),
    FixedPermutation(7, seed=3),
    Standardize(4, mean=torch.tensor([1.0, -2.0, 0.5, 0.0]), std=torch.tensor([0.5, 2.0, 1.0, 3.0])),
])
def test_blocks_invert_and_logdets_cancel(block):
    _randomise(block)
    x = torch.randn(16, block.dim, dtype=torch.float64)
    block = block.double()
    y, ld = block(x)
    x2, ld_rev = block(y, rev=True)
    assert ld.shape == (16,)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ld_rev, -ld, atol=1e-10, rtol=1e-10)


def test_model_inverse_of_forward_is_identity():
    m = DensityModel(9, n_blocks=3, hidden=16, clamp=2.0).double()
    _randomise(m, scale=0.2)
    x = torch.randn(32, 9, dtype=torch.float64)
    z, _ = m(x)
    torch.testing.assert_close(m.inverse(z), x, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dim", [4, 5])
def test_log_det_matches_numerical_jacobian(dim):
    m = DensityModel(dim, n_blocks=2, hidden=8, clamp=2.0,
                     mean=torch.linspace(-1, 1, dim), std=torch.linspace(0.5, 2.0, dim)).double()
    _randomise(m, scale=0.4)
    for i in range(3):
        x = torch.randn(1, dim, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: m(v.unsqueeze(0))[0].squeeze(0), x.squeeze(0))
        expected = torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(m(x)[1].squeeze(0), expected, atol=1e-8, rtol=1e-8)


def test_nll_keeps_every_term():
    """Identity coupling blocks and unit standardisation: NLL is the exact standard-normal NLL."""
    m = DensityModel(3, n_blocks=2, hidden=4)          # zero-initialised couplings = identity
    x = torch.randn(10, 3)
    expected = 0.5 * (x ** 2).sum(1) + 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(m.nll(x), expected)
    # a standardisation by std 2 changes the density by -log 2 per dim (the log-det term)
    m2 = DensityModel(3, n_blocks=1, hidden=4, std=torch.full((3,), 2.0))
    expected2 = 0.5 * ((x / 2) ** 2).sum(1) + 1.5 * math.log(2 * math.pi) + 3 * math.log(2.0)
    torch.testing.assert_close(m2.nll(x), expected2)


def test_dims_checked_at_construction_and_call():
    with pytest.raises(ValueError, match="dim must be an int >= 2"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 6\)"):
        AffineCoupling(6, hidden=4)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mean/std must have 4 values"):
        Standardize(4, mean=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(N, T, 6\)"):
        DensityModel(6, n_blocks=1, hidden=4).score(torch.zeros(2, 6))


def _blob(n, dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) * 0.5
    return (rng.normal(size=(n, dim)) @ a + 3.0).astype(np.float32)


def test_training_lowers_nll_and_scores_outliers_higher():
    train, val = _blob(600, 6, 0), _blob(60, 6, 0)[:, None, :]
    cfg = FitConfig(n_blocks=3, hidden=32, clamp=2.0, epochs=15, batch_size=64, lr=2e-3, seed=1)
    res = fit_density(train, val, cfg)
    h = res.history
    assert h[-1]["train_nll"] < h[0]["train_nll"] - 0.1
    assert 1 <= res.best_epoch <= cfg.epochs
    inliers = torch.from_numpy(_blob(50, 6, 7)[:, None, :])
    outliers = inliers + 4.0
    s_in, s_out = res.model.score(inliers), res.model.score(outliers)
    assert s_out.min() > s_in.median()


def test_fit_is_seeded():
    train = _blob(200, 4, 0)
    cfg = FitConfig(n_blocks=2, hidden=16, epochs=3, batch_size=32, lr=1e-3, seed=5)
    a, b = fit_density(train, None, cfg), fit_density(train, None, cfg)
    x = torch.from_numpy(train[:20, None, :])
    torch.testing.assert_close(a.model.score(x), b.model.score(x), rtol=0, atol=0)
    assert a.history == b.history
