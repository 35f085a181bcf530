"""Stage synth (AUGMENT -> SYNTH): StyleGAN2-ADA synthetic normals from the good train images.

Trains the generator (:mod:`defectflow.synth.fit`) on the ``split == train``, ``label == good``
images of ``synth.source`` (``roi``: the originals, ``augment``: originals and augmented copies),
never on validation or test rows, under the ``synth.minutes`` / ``synth.kimg`` budget, warm-started
from the previous ``out_dir/generator.pt`` when ``synth.warm_start`` (and the networks match).
Writes into ``out_dir`` (atomically):

- ``generator.pt``            checkpoint (G, D, EMA G, optimisers, ADA p, RNG): the next run's warm start
- ``samples/synth_<seed>.png`` ``synth.n_images`` EMA samples at truncation ``synth.psi``
- ``samples.parquet``         their SYNTH rows (train split, ``synthetic`` True, ``synth_seed``, ``synth_psi``)
- ``quality/kid.csv``          kimg, seconds, p, kid, fid (EMA samples vs held-out real goods = val split)
- ``quality/kid.png``, ``quality/grid.png`` (samples above real ones), ``quality.json``
- ``manifest.parquet``        every input row (``synthetic`` False) plus, with ``synth.use_in_training``,
  the sample rows; without it the samples stay out of the manifest (so train never sees them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import pandas as pd

from defectflow.config import Params
from defectflow.manifest import AUGMENT, SYNTH, read_manifest, write_manifest
from defectflow.stage import StageReport, logger, manifest_path, skip_stage, stage_run
from defectflow.synth.fit import fit, load_images, pick_device
from defectflow.synth.networks import NetConfig
from defectflow.synth.plots import plot_kid
from defectflow.synth.quality import FeatureModel, image_grid
from defectflow.synth.samples import image_seeds, save_samples, synthetic_rows
from defectflow.synth.trainer import TrainConfig

CHECKPOINT = "generator.pt"
MIN_TRAIN = 2
EVAL_SAMPLES = 128   # samples per KID / FID evaluation in the stage (bench/synth.py: 256)
log = logger("synth")


def training_images(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """The good train rows the generator learns from (``roi``: originals only; ``augment``: with copies)."""
    rows = df[(df["split"] == "train") & (df["label"] == "good")]
    if source == "roi" and "augment_of" in rows:
        rows = rows[rows["augment_of"].isna()]
    return rows


def heldout_images(df: pd.DataFrame) -> pd.DataFrame:
    """Held-out real goods for KID / FID: the validation split's originals."""
    rows = df[(df["split"] == "val") & (df["label"] == "good")]
    return rows[rows["augment_of"].isna()] if "augment_of" in rows else rows


def run(params: Params, inp: Path, out_dir: Path) -> StageReport:
    """Train the generator, write samples and quality figures; forward every input row."""
    sp = params.synth
    df = read_manifest(manifest_path(inp), AUGMENT).assign(synthetic=False)
    if not sp.enabled:
        return skip_stage("synth", df, SYNTH, inp, out_dir, "synth disabled (synth.enabled=false)")
    train_rows, held_rows = training_images(df, sp.source), heldout_images(df)
    if len(train_rows) < MIN_TRAIN:
        return skip_stage("synth", df, SYNTH, inp, out_dir,
                          f"only {len(train_rows)} good train image(s) in {manifest_path(inp)}; "
                          f"the generator needs {MIN_TRAIN}")
    out_dir = Path(out_dir)
    previous = out_dir / CHECKPOINT
    warm = previous if sp.warm_start and previous.is_file() else None
    device = pick_device(sp.device)
    net = NetConfig(size=sp.size, channel_base=sp.channel_base, channel_max=sp.channel_max)
    cfg = TrainConfig(batch=sp.batch, lr=sp.lr, ema_kimg=sp.ema_kimg, ada_kimg=sp.ada_kimg)
    t0 = time.perf_counter()
    reals = load_images(list(train_rows["image_path"]), sp.size)
    heldout = load_images(list(held_rows["image_path"]), sp.size) if len(held_rows) >= 2 else None
    features = FeatureModel(threads=sp.threads) if heldout is not None else None
    read_s = time.perf_counter() - t0
    with stage_run("synth", out_dir) as (out, report):
        ckpt, _ = out.path(CHECKPOINT)
        res = fit(reals, heldout, net, cfg, minutes=sp.minutes, max_kimg=sp.kimg, checkpoint=ckpt, seed=params.seed,
                  device=device, warm_start=warm, evals=sp.quality_evals, features=features, threads=sp.threads,
                  eval_samples=EVAL_SAMPLES)
        seeds = image_seeds(params.seed, sp.n_images)
        tmp_samples, rec_samples = out.path("samples")
        paths = save_samples(res.trainer.g_ema, seeds, sp.psi, tmp_samples)
        rows = synthetic_rows(train_rows.iloc[0], [f"{rec_samples}/{p.name}" for p in paths], seeds, sp.psi)
        write_manifest(rows, SYNTH, out.path("samples.parquet")[0])
        out_df = pd.concat([df, rows], ignore_index=True) if sp.use_in_training and len(rows) else df
        quality = write_quality(out, res, reals, heldout, sp.psi)
        summary = {**quality, "device": device, "source": sp.source, "n_train_real": len(train_rows),
                   "n_heldout": len(held_rows), "n_samples": len(rows), "use_in_training": sp.use_in_training,
                   "warm_started_from": res.warm_started_from, "read_s": round(read_s, 1), "net": net.to_dict()}
        out.path("quality.json")[0].write_text(json.dumps(summary, indent=2))
        write_manifest(out_df, SYNTH, out.manifest, meta={"synth": json.dumps(summary)})
        report.read.append(str(inp))
        report.wrote += [str(out_dir / CHECKPOINT), str(out_dir / "samples"), str(out_dir / "quality")]
        report.n_in, report.n_out = len(df), len(out_df)
        start = f"warm start from {res.warm_started_from}" if res.warm_started_from else "from scratch"
        kid_note = (f"KID {quality['kid_untrained']:.4g} -> {quality['kid_trained']:.4g} "
                    f"(real halves {quality['kid_real_halves']:.4g})" if quality["kid_trained"] is not None
                    else "no KID (fewer than 2 held-out val goods)")
        report.notes.append(
            f"trained {sp.size} px on {len(train_rows)} good train images ({sp.source}) {start}, {device}: "
            f"{quality['kimg']:.2f} kimg in {res.train_s:.1f} s, ADA p {quality['ada_p']:.3f}; {kid_note}")
        report.notes.append(f"{len(rows)} synthetic normals in {out_dir / 'samples'}: "
                            + ("added to the train split" if sp.use_in_training and len(rows)
                               else "not used for training (synth.use_in_training=false), listed in samples.parquet"))
    return report


def write_quality(out, res, reals, heldout, psi: float) -> dict:
    """quality/kid.csv, kid.png, grid.png; returns the headline figures."""
    hist = pd.DataFrame(res.history)
    hist.to_csv(out.path("quality/kid.csv")[0], index=False)
    plot_kid(hist, res.kid_real_halves, out.path("quality/kid.png")[0], title="synth: KID during training")
    fakes = res.trainer.sample(16, seed=1, psi=psi)
    shown = (heldout if heldout is not None else reals)[:16]
    cv2.imwrite(str(out.path("quality/grid.png")[0]), cv2.cvtColor(image_grid(fakes, shown), cv2.COLOR_RGB2BGR))
    return {"kimg": res.trainer.nimg / 1000, "train_s": round(res.train_s, 1), "ada_p": res.trainer.ada.p,
            "kid_untrained": res.kid_untrained, "kid_trained": res.kid_trained,
            "kid_real_halves": res.kid_real_halves,
            "fid_untrained": res.history[0].get("fid") if res.history else None,
            "fid_trained": res.history[-1].get("fid") if res.history else None}
