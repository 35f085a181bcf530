"""A tiny project for the nightly tests: a videos source, a fake `dvc repro` (writes a model whose
quality the test chooses) and a fake scorer, so the lock, kill, gate and registry logic run in seconds."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

FAKE_REPRO = '''
import sys, time
from pathlib import Path
from defectflow.fsutil import atomic_dir
quality, sleep_s, loss = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
Path("models").mkdir(exist_ok=True)
with atomic_dir("models/model") as tmp:
    (tmp / "quality.txt").write_text(str(quality))
    (tmp / "train_loss.csv").write_text("epoch,train_nll,val_nll\\n0,1.0,1.1\\n1,0.5," + loss + "\\n")
    print("training ...", flush=True)
    time.sleep(sleep_s)
Path("models/threshold.json").write_text('{"threshold": 0.9}')
print("trained", flush=True)
'''


def write_video(path: Path, n_frames: int = 10, size: tuple[int, int] = (64, 48), fps: float = 10.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for _ in range(n_frames):
        w.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    w.release()
    return path


def make_project(root: Path, n_train: int = 2, registry_db: Path | None = None, **params) -> Path:
    """A project folder: params.yaml (videos source data/src), videos.csv, fake repro script."""
    src = root / "data" / "src"
    (src / "videos").mkdir(parents=True)
    rows = []
    for i in range(n_train):
        write_video(src / "videos" / f"r{i}_cam0.avi", seed=100 + i)
        rows.append({"video": f"videos/r{i}_cam0.avi", "camera": "cam0", "run": f"r{i}", "split": "train", "label": ""})
    write_video(src / "videos" / "t0_cam0.avi", seed=99)
    rows.append({"video": "videos/t0_cam0.avi", "camera": "cam0", "run": "t0", "split": "test", "label": ""})
    pd.DataFrame(rows).to_csv(src / "videos.csv", index=False)
    data = {"source": {"kind": "videos", "path": "data/src"}, **params}
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    (root / "fake_repro.py").write_text(FAKE_REPRO)
    if registry_db is not None:
        (root / "registry").mkdir()
        shutil.copy(registry_db, root / "registry" / "mlflow.db")
    return root


def repro_cmd(quality: float, sleep_s: float = 0.0, loss: str = "0.6") -> list[str]:
    return [sys.executable, "fake_repro.py", str(quality), str(sleep_s), loss]


def fake_eval(project: Path) -> pd.DataFrame:
    return pd.DataFrame({"label": ["good"] * 20 + ["defect"] * 10})


def fake_scorer(model_dir: Path, rows: pd.DataFrame, params) -> np.ndarray:
    """Goods spread over [0, 1]; defects shifted up by the model's quality (higher = better AUROC)."""
    q = float((Path(model_dir) / "quality.txt").read_text())
    good, bad = rows.label == "good", rows.label == "defect"
    s = np.zeros(len(rows))
    s[good.to_numpy()] = np.linspace(0, 1, int(good.sum()))
    s[bad.to_numpy()] = np.linspace(0, 1, int(bad.sum())) + q
    return s


DRIVER = '''
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from defectflow.config import load_params
from defectflow.nightly import run_nightly
import nightly_fakes as nf
r = run_nightly(load_params("params.yaml"), Path("."), repro_cmd=nf.repro_cmd(float(sys.argv[1]), float(sys.argv[2])),
                scorer=nf.fake_scorer, evaluation=nf.fake_eval)
print("decision", r.decision and r.decision.promoted, flush=True)
'''


def write_driver(root: Path) -> Path:
    f = root / "driver.py"
    f.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    return f


def decision_file(root: Path, version: int) -> dict:
    return json.loads((root / "registry" / "decisions" / f"v{version}.json").read_text())
