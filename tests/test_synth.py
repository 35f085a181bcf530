"""synth: StyleGAN2-ADA networks, ADA, training, resume, quality metrics and the DVC stage (tiny nets, 16 px)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from vision_scene import write_images

from defectflow import synth
from defectflow.config import params_from_dict
from defectflow.manifest import AUGMENT, SYNTH, read_manifest, read_meta
from defectflow.synth import stage as synth_stage
from defectflow.synth.ada import AdaController, augment
from defectflow.synth.fit import fit
from defectflow.synth.networks import Discriminator, Generator, NetConfig
from defectflow.synth.quality import fid, kid
from defectflow.synth.trainer import CheckpointError, TrainConfig, Trainer, load_generator

TINY = NetConfig(size=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)
TINY_PARAMS = {"size": 16, "channel_base": 128, "channel_max": 16, "batch": 8, "threads": 1}


def discs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Bright discs of random colour and position on a dark background, ``(n, 3, S, S)`` in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, 3, size, size), -0.8, np.float32)
    for k in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.3) ** 2
        out[k][:, inside] = rng.uniform(0.3, 0.9, 3)[:, None]
    return torch.from_numpy(out)


def pixel_features(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.avg_pool2d(x, 2).flatten(1).double().numpy()


def test_shapes_and_style_mixing():
    g, d = Generator(TINY), Discriminator(TINY)
    z = torch.randn(4, TINY.z_dim)
    img = g(z)
    assert img.shape == (4, 3, 16, 16) and d(img).shape == (4,)
    ws = g.ws(z, z_mix=torch.randn(4, TINY.z_dim), cutoff=2)
    assert ws.shape == (4, g.num_ws, TINY.w_dim)
    assert torch.equal(ws[:, 0], ws[:, 1]) and not torch.allclose(ws[:, 1], ws[:, 2])
    g.mapping.w_avg.copy_(torch.ones(TINY.w_dim))
    assert torch.allclose(g.mapping(z, psi=0.0), torch.ones(4, TINY.w_dim))   # full truncation: the mean w


def test_gradients_reach_every_parameter():
    g, d = Generator(TINY), Discriminator(TINY)
    rng = torch.Generator().manual_seed(0)
    loss = d(augment(g(torch.randn(8, TINY.z_dim)), 1.0, rng)).mean()
    loss.backward()
    for name, p in list(g.named_parameters()) + list(d.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_augment_is_identity_at_p0_and_differentiable():
    x = discs(8).requires_grad_(True)
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0.0, rng), x)
    y = augment(x, 1.0, rng)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(N, 3, S, S\)"):
        augment(torch.zeros(2, 3, 8, 4), 0.5, rng)


def test_ada_p_rises_when_d_overfits_and_falls_otherwise():
    ada = AdaController(target=0.6, ada_kimg=1.0, interval=4)
    for _ in range(40):
        ada.observe(torch.full((16,), 3.0))          # D sure of every real: overfitting
    high = ada.p
    assert high > 0.5
    for _ in range(20):
        ada.observe(torch.tensor([1.0, -1.0] * 8))   # r_t = 0 < 0.6
    assert ada.p < high
    for _ in range(100):
        ada.observe(torch.full((16,), -1.0))
    assert ada.p == 0.0


def test_kid_and_fid_separate_close_from_far_sets():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), rng.normal(1.0, 1.0, size=(200, 8))
    assert abs(kid(a, b)) < 0.2 * kid(a, c) and fid(a, b) < 0.2 * fid(a, c)


STEPS = 120


@pytest.mark.slow
def test_training_lowers_kid_against_the_untrained_generator(tmp_path):
    torch.set_num_threads(1)
    reals, held = discs(64, seed=1), discs(64, seed=2)
    cfg = TrainConfig(batch=4, lr=0.005, ema_kimg=0.05, ada_kimg=2.0)
    trainer = Trainer(TINY, cfg, reals, seed=0)
    untrained = kid(pixel_features(trainer.sample(128, seed=9)), pixel_features(held))
    for _ in range(STEPS):
        trainer.train_step()
    trained = kid(pixel_features(trainer.sample(128, seed=9)), pixel_features(held))
    assert trained < 0.5 * untrained, (untrained, trained)


def test_resume_reproduces_the_same_next_step(tmp_path):
    cfg = TrainConfig(batch=4, r1_interval=2)
    a = Trainer(TINY, cfg, discs(16), seed=3)
    a.ada.p = 0.4
    for _ in range(3):
        a.train_step()
    a.save(tmp_path / "g.pt")
    a.train_step()
    b = Trainer(TINY, cfg, discs(16), seed=99)
    b.load(tmp_path / "g.pt")
    b.train_step()
    assert a.step == b.step and a.nimg == b.nimg and a.ada.p == b.ada.p
    for (name, pa), pb in zip(a.G.state_dict().items(), b.G.state_dict().values()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(a.D.parameters(), b.D.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(CheckpointError, match="differ from the requested"):
        Trainer(NetConfig(size=16, z_dim=16, w_dim=16, channel_base=128, channel_max=8), cfg, discs(4)).load(
            tmp_path / "g.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_generator(tmp_path / "bad.pt")


def test_fit_respects_the_kimg_budget_and_logs_kid(tmp_path):
    class Pixels:
        def __call__(self, x):
            return pixel_features(x)
    res = fit(discs(16), discs(8, seed=5), TINY, TrainConfig(batch=4), minutes=None, max_kimg=0.04,
              checkpoint=tmp_path / "g.pt", evals=2, features=Pixels())
    assert res.trainer.nimg == 40 and [h["kimg"] for h in res.history] == [0.0, 0.02, 0.04]
    assert all(np.isfinite(h["kid"]) for h in res.history) and res.kid_real_halves is not None
    assert (tmp_path / "g.pt").is_file()


def _augment_input(root: Path, n_train=6, n_val=0, n_test=2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = n_train + n_val + n_test
    imgs = [(rng.uniform(0, 255, (24, 24, 3))).astype(np.uint8) for _ in range(n)]
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return write_images(root, imgs, AUGMENT, split=splits)


def _params(**synth_over):
    return params_from_dict({"synth": {**TINY_PARAMS, "minutes": None, "kimg": 0.016, "n_images": 5, **synth_over}})


@pytest.mark.slow
def test_stage_writes_generator_samples_and_quality_and_keeps_samples_out_of_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synth_stage, "FeatureModel", lambda threads: pixel_features)
    src = _augment_input(Path("aug"), n_val=4)
    report = synth.run(_params(), Path("aug"), Path("out/synth"))
    df = read_manifest("out/synth/manifest.parquet", SYNTH)
    assert list(df.item_id) == list(src.item_id) and not df.synthetic.any()
    samples = read_manifest("out/synth/samples.parquet", SYNTH)
    assert len(samples) == 5 and samples.synthetic.all() and set(samples.split) == {"train"}
    assert samples.synth_seed.is_unique and (samples.synth_psi == 1.0).all()
    assert all(Path(p).is_file() and p.startswith("out/synth/samples/") for p in samples.image_path)
    for f in ("generator.pt", "quality/kid.csv", "quality/kid.png", "quality/grid.png", "quality.json"):
        assert Path("out/synth", f).is_file(), f
    kid_csv = pd.read_csv("out/synth/quality/kid.csv")
    assert {"kimg", "kid", "fid", "p"} <= set(kid_csv.columns) and kid_csv.kimg.iloc[-1] == 0.016
    meta = json.loads(read_meta("out/synth/manifest.parquet")["synth"])
    assert meta["n_train_real"] == 6 and meta["n_heldout"] == 4 and meta["warm_started_from"] is None
    assert any("not used for training" in n for n in report.notes)

    # nightly retrain: warm start from the previous generator, samples join the train split
    report = synth.run(_params(use_in_training=True), Path("aug"), Path("out/synth"))
    df = read_manifest("out/synth/manifest.parquet", SYNTH)
    syn = df[df.synthetic]
    assert len(syn) == 5 and set(syn.split) == {"train"} and set(syn.label) == {"good"}
    assert json.loads(read_meta("out/synth/manifest.parquet")["synth"])["warm_started_from"] == "out/synth/generator.pt"
    assert any("warm start from out/synth/generator.pt" in n for n in report.notes)


def test_stage_trains_on_train_goods_of_the_chosen_source_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _augment_input(Path("aug"), n_train=4, n_val=2)
    df = src.assign(augment_of=[None, None, "im00", "im01", None, None, None, None],
                    label=["good"] * 7 + ["defect"])
    assert list(synth_stage.training_images(df, "roi").item_id) == ["im00", "im01"]
    assert list(synth_stage.training_images(df, "augment").item_id) == ["im00", "im01", "im02", "im03"]
    assert list(synth_stage.heldout_images(df).item_id) == ["im04", "im05"]


def test_disabled_forwards_rows_as_real(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_images(Path("aug"), [np.zeros((8, 8, 3), np.uint8)] * 3, AUGMENT)
    report = synth.run(params_from_dict({"synth": {"enabled": False}}), Path("aug"), Path("out/synth"))
    df = read_manifest("out/synth/manifest.parquet", SYNTH)
    assert list(df.item_id) == list(src.item_id) and not df.synthetic.any()
    assert read_meta("out/synth/manifest.parquet")["skipped"] == "synth disabled (synth.enabled=false)"
    assert report.n_in == report.n_out == 3


def test_too_few_train_goods_is_said_and_rows_forwarded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(Path("aug"), [np.zeros((8, 8, 3), np.uint8)], AUGMENT)
    report = synth.run(_params(), Path("aug"), Path("out/synth"))
    assert "only 1 good train image" in read_meta("out/synth/manifest.parquet")["skipped"]
    assert report.n_out == 1


def test_budget_is_required():
    with pytest.raises(Exception, match="minutes and/or kimg"):
        params_from_dict({"synth": {"minutes": None, "kimg": None}})
