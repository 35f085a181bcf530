"""The gate: score the challenger and the champion on the same fixed evaluation set, promote only if
the challenger is not worse beyond ``gate.max_auroc_drop`` (image AUROC) and ``gate.max_far_increase``
(false-alarm rate on the good images at each model's own fitted threshold)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from defectflow import layout
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.registry.provenance import provenance
from defectflow.registry.store import ModelVersion, Registry
from defectflow.stage import logger

log = logger("gate")
# scorer(model_dir, eval_rows, params) -> one score per row (higher = more defective)
Scorer = Callable[[Path, pd.DataFrame, Params], np.ndarray]


class GateError(DefectflowError):
    """The challenger cannot be gated: no evaluation set, NaN loss or NaN scores."""


@dataclass
class Decision:
    promoted: bool
    reasons: list[str]
    challenger: dict                      # version, metrics
    champion: dict | None                 # the champion it was compared with (None: first model)
    tolerances: dict = field(default_factory=dict)
    eval_set: dict = field(default_factory=dict)
    decided_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def markdown(self) -> str:
        head = "PROMOTED" if self.promoted else "REJECTED"
        rows = ["| model | version | image AUROC | false-alarm rate | threshold |", "| --- | --- | --- | --- | --- |"]
        for name, m in (("challenger", self.challenger), ("champion", self.champion)):
            if m:
                mm = m["metrics"]
                rows.append(f"| {name} | {m['version']} | {mm['image_auroc']:.4f} | "
                            f"{mm['false_alarm_rate']:.4f} | {mm['threshold']:.4g} |")
        return "\n".join([f"## Nightly gate: challenger v{self.challenger['version']} {head}", "",
                          *rows, "", *[f"- {r}" for r in self.reasons], "",
                          f"tolerances: {self.tolerances}; evaluation set: {self.eval_set}"])


def eval_rows(project: Path | str = ".") -> pd.DataFrame:
    """The fixed evaluation set: the test split's centre views (originals), as evaluate judges them."""
    from defectflow.manifest import SYNTH, read_manifest
    from defectflow.scoring import select_rows
    from defectflow.stage import manifest_path

    src = Path(project) / layout.STAGE_DIRS["synth"]
    df = select_rows(read_manifest(manifest_path(src), SYNTH), "test")
    df = df[df["label"].isin(["good", "defect"])].reset_index(drop=True)
    if df.empty or df["label"].nunique() < 2:
        raise GateError(f"{src}: the evaluation set (split=test) needs good and defective images, "
                        f"has {df['label'].value_counts().to_dict()}")
    return df


def pipeline_scorer(model_dir: Path, rows: pd.DataFrame, params: Params) -> np.ndarray:
    """Score rows with a model folder as the pipeline does (every head, ``train.score_from``)."""
    from defectflow.scoring import score_items

    scored = score_items(rows, model_dir, params)
    if len(scored) != len(rows):
        raise GateError(f"{model_dir}: {len(rows) - len(scored)} evaluation image(s) unreadable")
    return scored["score"].to_numpy(float)


def metrics_of(scores: np.ndarray, labels: pd.Series, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, float)
    bad = labels.to_numpy() == "defect"
    if not np.isfinite(scores).all():
        return {"image_auroc": math.nan, "false_alarm_rate": math.nan, "threshold": threshold,
                "n_good": int((~bad).sum()), "n_defect": int(bad.sum()), "non_finite": int((~np.isfinite(scores)).sum())}
    return {"image_auroc": float(roc_auc_score(bad, scores)),
            "false_alarm_rate": float((scores[~bad] >= threshold).mean()), "threshold": float(threshold),
            "n_good": int((~bad).sum()), "n_defect": int(bad.sum())}


def check_loss(model_dir: Path) -> None:
    """Stop on a NaN / infinite training or validation loss (``train_loss.csv``)."""
    f = Path(model_dir) / "train_loss.csv"
    if not f.is_file():
        return
    curve = pd.read_csv(f)
    cols = [c for c in ("train_nll", "val_nll") if c in curve.columns]
    vals = curve[cols].to_numpy(float)
    if len(vals) == 0 or not np.isfinite(vals).all():
        epochs = curve.loc[~np.isfinite(vals).all(axis=1), "epoch"].tolist() if len(vals) else []
        raise GateError(f"{f}: NaN or infinite loss (epochs {epochs[:5]}); the model is not registered, "
                        "the champion stays")


def compare(chall: dict, champ: dict | None, params: Params) -> tuple[bool, list[str]]:
    g = params.gate
    if not (math.isfinite(chall["image_auroc"]) and math.isfinite(chall["false_alarm_rate"])):
        return False, ["challenger scores are not finite (NaN / inf)"]
    if champ is None:
        return True, ["no champion yet: the first model is promoted"]
    reasons, ok = [], True
    drop = champ["image_auroc"] - chall["image_auroc"]
    rise = chall["false_alarm_rate"] - champ["false_alarm_rate"]
    for what, value, tol in (("image AUROC drop", drop, g.max_auroc_drop),
                             ("false-alarm rate increase", rise, g.max_far_increase)):
        passed = value <= tol + 1e-12
        ok &= passed
        reasons.append(f"{what} {value:+.4f} {'<=' if passed else '>'} tolerance {tol:+.4f}")
    return ok, reasons


def run_gate(params: Params, project: Path | str = ".", *, scorer: Scorer = pipeline_scorer,
             evaluation: Callable[[Path], pd.DataFrame] = eval_rows,
             registry: Registry | None = None) -> Decision | None:
    """Register the freshly trained model, gate it against the champion, promote or reject it.

    Returns None when ``models/model`` is the model already registered last (nothing new)."""
    t0 = time.monotonic()
    project = Path(project)
    reg = registry or Registry(project / params.registry.path, params.registry.keep)
    model_dir, thr_file = project / layout.STAGE_DIRS["train"], project / layout.THRESHOLD_FILE
    check_loss(model_dir)
    prov = provenance(params, model_dir, thr_file, project)
    versions = reg.list()
    same = versions[-1] if versions and versions[-1].provenance.get("model_hash") == prov["model_hash"] else None
    if same is not None and same.status != "candidate":
        log.info("gate: %s is version %d already (model hash %s, %s): nothing new to gate",
                 model_dir, same.version, prov["model_hash"], same.status)
        return None
    rows = evaluation(project)
    chall_thr = float(json.loads(thr_file.read_text())["threshold"])
    chall_m = metrics_of(scorer(model_dir, rows, params), rows["label"], chall_thr)
    champ = reg.champion()
    champ_m = None
    if champ is not None:
        champ_thr = float(json.loads(champ.threshold_file.read_text())["threshold"])
        champ_m = metrics_of(scorer(champ.model_dir, rows, params), rows["label"], champ_thr)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if same is not None:            # registered by a run that died before deciding: decide now
        log.info("gate: version %d was registered but never decided; gating it now", same.version)
        reg.set_metrics(same.version, chall_m)
        version = same
    else:
        version = reg.register(model_dir, thr_file, chall_m, prov, now)
    ok, reasons = compare(chall_m, champ_m, params)
    if ok:
        reg.promote(version.version, reasons)
    else:
        reg.reject(version.version, reasons)
    reg.prune()
    decision = Decision(
        promoted=ok, reasons=reasons, challenger={"version": version.version, "metrics": chall_m},
        champion=None if champ is None else {"version": champ.version, "metrics": champ_m},
        tolerances=params.gate.model_dump(), decided_at=now,
        eval_set={"rows": len(rows), "good": int((rows.label == "good").sum()),
                  "defect": int((rows.label == "defect").sum()), "from": str(layout.STAGE_DIRS["synth"]) + " (split test)"})
    out = reg.root / "decisions" / f"v{version.version}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(decision.to_json())
    log.info("gate: challenger v%d %s in %.1fs (%s); decision %s", version.version,
             "PROMOTED" if ok else "REJECTED", time.monotonic() - t0, "; ".join(reasons), out)
    return decision


def describe(v: ModelVersion) -> str:
    m = v.metrics
    auroc = f"{m['image_auroc']:.4f}" if "image_auroc" in m else "-"
    far = f"{m['false_alarm_rate']:.4f}" if "false_alarm_rate" in m else "-"
    return (f"{v.version:>4}  {('*' if v.is_champion else ' ')}{v.status:<9}  {v.created:<25}  auroc {auroc}  "
            f"far {far}  data {str(v.provenance.get('data_hash'))[:10]}  git {str(v.provenance.get('git_commit'))[:12]}"
            f"  params {str(v.provenance.get('params_hash'))[:10]}")
