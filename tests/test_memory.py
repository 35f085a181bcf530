"""The conv head's patch memory: coreset, patch features at a few cells, nearest-neighbour verification."""
import numpy as np
import pytest
import torch

from defectflow.density import memory as mem_mod
from defectflow.density.memory import PatchMemory, coreset, patch_maps, patch_vectors


def test_coreset_keeps_the_rare_patches_a_random_sample_loses():
    rng = np.random.default_rng(0)
    common = rng.normal(0, 0.1, (2000, 8)).astype(np.float32)
    rare = (np.eye(8, dtype=np.float32) * 5.0)[:5]                 # five far-off normal patches
    x = np.concatenate([common, rare])
    idx = coreset(x, 20, seed=0)
    assert len(idx) == 20 and len(set(idx)) == 20 and np.all(np.diff(idx) > 0)
    assert set(range(2000, 2005)) <= set(idx)
    assert np.array_equal(idx, coreset(x, 20, seed=0))               # seeded
    assert np.array_equal(coreset(x, 5000), np.arange(len(x)))       # asking for more keeps everything


def test_chunked_coreset_of_a_large_set_still_keeps_the_rare_patches(monkeypatch):
    monkeypatch.setattr(mem_mod, "CHUNK", 256)                       # several chunks on a small set
    rng = np.random.default_rng(1)
    common = rng.normal(0, 0.1, (3000, 200)).astype(np.float32)       # > PROJECTION_DIM: projected first
    rare = np.zeros((3, 200), np.float32)
    rare[[0, 1, 2], [0, 50, 100]] = 8.0
    x = np.concatenate([common, rare])
    idx = coreset(x, 40, seed=0)
    assert len(idx) == 40 and {3000, 3001, 3002} <= set(idx)


@pytest.mark.parametrize("fine,coarse", [(14, 7), (8, 4), (8, 2), (3, 2), (1, 1)])
def test_patch_vectors_at_cells_equal_the_whole_patch_map(fine, coarse):
    rng = np.random.default_rng(fine)
    m0 = rng.standard_normal((3, 5, fine, fine)).astype(np.float32)
    m1 = rng.standard_normal((3, 7, coarse, coarse)).astype(np.float32)
    full = patch_maps([torch.from_numpy(m0), torch.from_numpy(m1)], 3).numpy()
    assert full.shape == (3, 12, fine, fine)
    ys, xs = rng.integers(0, fine, (3, 6)), rng.integers(0, fine, (3, 6))
    got = patch_vectors([m0, m1], ys, xs, 3, (fine, fine))
    want = np.stack([full[i][:, ys[i], xs[i]].T for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_verify_scores_the_farthest_of_the_query_patches(tmp_path):
    rng = np.random.default_rng(2)
    bank = rng.normal(0, 1, (50, 6)).astype(np.float32)
    memory = PatchMemory(bank)
    near = bank[[3, 7, 9]][None]                                     # patches the memory holds: distance 0
    far = np.concatenate([bank[[3, 7]], bank[[9]] + 10.0])[None]     # one patch far from every memory patch
    scores = memory.verify(np.concatenate([near, far]))
    assert scores[0] == pytest.approx(0.0, abs=1e-3)
    assert scores[1] == pytest.approx(np.linalg.norm(bank - (bank[9] + 10.0), axis=1).min(), rel=1e-4)
    memory.save(tmp_path / "memory.npy")
    np.testing.assert_array_equal(PatchMemory.load(tmp_path / "memory.npy").bank, bank)
    (tmp_path / "bad.npy").write_text("not an array")
    with pytest.raises(ValueError, match="bad.npy: unreadable patch memory"):
        PatchMemory.load(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"queries must be \(n, 6\)"):
        memory.distances(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        PatchMemory.fit(np.full((4, 6), np.nan, np.float32), 2)


def test_verified_cells_follow_the_grid_with_a_floor():
    from defectflow.density.memory import verify_count
    assert verify_count(0.01, 54 * 54) == 29 and verify_count(0.01, 26 * 26) == 7       # 448 px, 224 px inner grids
    assert verify_count(0.04, 54 * 54) == 117                                           # share of the cells
    assert verify_count(0.01, 36) == 4 and verify_count(0.5, 3) == 3                    # floor of 4, never above all
