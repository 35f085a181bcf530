"""Make the Magnetic Tile defect data set into MVTec-AD layout (symlinks), outside the repo.

    python bench/magtile_layout.py [--src ../shared/datasets/magnetic_tile] [--out /tmp/magnetic_tile_mvtec]

- ``train/good``: 600 ``MT_Free`` images chosen with ``numpy.random.default_rng(seed)`` (seed 0)
- ``test/good``: the other ``MT_Free`` images; ``test/<type>``: every image of ``MT_<Type>``
  (type lower-cased: blowhole, break, crack, fray, uneven)
- ``ground_truth/<type>/<stem>_mask.png``: the same-name ``.png`` masks of the defect images

Prints one JSON line with the counts and the output folder. Refuses to write inside the repo.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 600


def build(src: Path, out: Path, seed: int = 0, n_train: int = N_TRAIN) -> dict:
    src, out = src.resolve(), out.resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"{out}: refusing to write the data set inside the repository ({REPO})")
    free = sorted((src / "MT_Free" / "Imgs").glob("*.jpg"))
    if len(free) <= n_train:
        raise SystemExit(f"{src}/MT_Free/Imgs: {len(free)} images, need more than {n_train}")
    pick = set(np.random.default_rng(seed).choice(len(free), size=n_train, replace=False).tolist())
    if out.exists():
        shutil.rmtree(out)
    counts: dict[str, int] = {}

    def link(target: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, dest)

    for i, p in enumerate(free):
        sub = "train/good" if i in pick else "test/good"
        link(p, out / sub / p.name)
        counts[sub] = counts.get(sub, 0) + 1
    for folder in sorted(src.glob("MT_*")):
        if folder.name == "MT_Free":
            continue
        kind = folder.name[3:].lower()
        for p in sorted((folder / "Imgs").glob("*.jpg")):
            link(p, out / "test" / kind / p.name)
            mask = p.with_suffix(".png")
            if mask.is_file():
                link(mask, out / "ground_truth" / kind / f"{p.stem}_mask.png")
            counts[f"test/{kind}"] = counts.get(f"test/{kind}", 0) + 1
    return {"out": str(out), "seed": seed, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "datasets" / "magnetic_tile"))
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "magnetic_tile_mvtec"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build(Path(args.src), Path(args.out), args.seed)))


if __name__ == "__main__":
    sys.exit(main())
