"""Synthetic multi-camera product videos for demos and tests (see ARCHITECTURE.md, "Demo data format").

Four cameras stand 90 degrees apart around the inspection spot of a conveyor. Bottles and jars
(a shaded body + shoulder + neck silhouette with a printed label) cross each camera's view over
a textured, noisy background. The label is printed on part of the circumference and each
product sits on the belt at a random turn, so every camera sees a different side. Defective
products carry one defect (scratch, dent, stain, crack) at an angle on the circumference; only
cameras within ``VISIBLE_DEG`` of that angle see it (``defect_cameras``).

Simplification: every camera sees the product cross its view horizontally (cam0/cam1 left to
right, cam2/cam3 right to left), all reaching the inspection spot at the same frame.

    python -m defectflow.sources.demo data/demo --size small --seed 0   (or: python -m defectflow.cli demo)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.errors import DefectflowError
from defectflow.fsutil import atomic_dir, write_image
from defectflow.sources.demo_render import (CAMERA_DEG, CAMERAS, VISIBLE_DEG, Product, _sprite_width,  # noqa: F401
                                            render_sprite)

WIDTH, HEIGHT, FPS = 320, 240, 25
CAMERA_DIRECTION = {"cam0": 1, "cam1": 1, "cam2": -1, "cam3": -1}  # +1: left to right
DEFECT_TYPES = ("scratch", "dent", "stain", "crack")
DEFECT_SHARE = 0.45     # share of defective products in val/test runs
LEAD_FRAMES = 10        # empty belt before the first product
GAP_FRAMES = (5, 10)    # empty belt between products (inclusive range)
SPEED = (10.0, 13.0)    # belt speed, pixels per frame (per run)
BELT_Y = (168, 228)     # belt rows

# (runs, products per run) per split
SIZES = {
    "tiny": {"train": (1, 6), "val": (1, 4), "test": (1, 4)},
    "small": {"train": (3, 10), "val": (1, 10), "test": (2, 10)},
}


@dataclass(frozen=True)
class Run:
    name: str
    split: str
    index: int
    speed: float
    starts: tuple[int, ...]           # first frame of each pass
    n_frames: int
    products: tuple[Product, ...]


# ----------------------------------------------------------------------------- planning

def _plan_products(run: str, split: str, n: int, rng: np.random.Generator, defects: list[str]) -> list[Product]:
    """Products of one run; ``defects`` lists the defect type of each defective one (in order)."""
    flags = np.zeros(n, bool)
    if defects:
        flags[rng.choice(n, size=len(defects), replace=False)] = True
    types = iter(defects)
    out = []
    for k in range(n):
        dtype = next(types) if flags[k] else None
        out.append(Product(
            product_id=f"{run}-p{k:03d}", run=run, pass_index=k, split=split,
            kind=str(rng.choice(["bottle", "jar"])),
            scale=float(rng.uniform(0.94, 1.06)),
            tint=tuple(float(v) for v in rng.normal(1.0, 0.035, 3)),
            y_base=int(BELT_Y[0] + 26 + rng.integers(-5, 6)),
            turn=float(rng.uniform(0, 2 * math.pi)),
            defect_type=dtype,
            defect_angle=float(rng.uniform(0, 2 * math.pi)),
            defect_height=float(rng.uniform(0.2, 0.8)),
            defect_seed=int(rng.integers(2**31)),
        ))
    return out


def _pass_frames(width: int, speed: float) -> int:
    return int(math.ceil((WIDTH + width) / speed)) + 1


def plan(size: str = "small", seed: int = 0) -> list[Run]:
    """Runs, timelines and products for a demo of ``size`` (deterministic in ``seed``)."""
    if size not in SIZES:
        raise DefectflowError(f"demo size must be one of {sorted(SIZES)}, got {size!r}")
    runs = []
    for s_idx, (split, (n_runs, n_products)) in enumerate(SIZES[size].items()):
        rng = np.random.default_rng([seed, 101, s_idx])
        n_def_per_run = 0 if split == "train" else max(1, int(DEFECT_SHARE * n_products + 0.5))
        types = [DEFECT_TYPES[i % len(DEFECT_TYPES)] for i in range(n_def_per_run * n_runs)]
        types = [types[i] for i in rng.permutation(len(types))]
        for r in range(n_runs):
            name = f"{split}-{r:02d}"
            rrng = np.random.default_rng([seed, 202, s_idx, r])
            products = _plan_products(name, split, n_products, rrng,
                                      types[r * n_def_per_run:(r + 1) * n_def_per_run])
            speed = float(rrng.uniform(*SPEED))
            starts, t = [], LEAD_FRAMES
            for p in products:
                starts.append(t)
                t += _pass_frames(_sprite_width(p), speed) + int(rrng.integers(GAP_FRAMES[0], GAP_FRAMES[1] + 1))
            runs.append(Run(name, split, len(runs), speed, tuple(starts), t, tuple(products)))
    return runs


# ----------------------------------------------------------------------------- drawing

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1] (random grid, bicubic upsampled)."""
    grid = rng.uniform(-1, 1, (cells[1], cells[0])).astype(np.float32)
    return np.clip(cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), -1, 1)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A camera's static scene: textured wall, conveyor belt with rails, floor; its own lighting."""
    h, w = HEIGHT, WIDTH
    yy = np.arange(h, dtype=np.float32)[:, None]
    grey = np.full((h, w), 100.0, np.float32) + 14 * _smooth_noise(rng, (h, w), (9, 7))
    grey += 5 * _smooth_noise(rng, (h, w), (40, 30))
    for x in rng.integers(20, w - 20, 3):                       # wall panel seams
        grey[:BELT_Y[0] - 4, x:x + 2] -= 18
    b0, b1 = BELT_Y
    belt = 55 + 6 * rng.standard_normal((b1 - b0, w)).astype(np.float32)
    belt = cv2.GaussianBlur(belt, (0, 0), 0.7) + 4 * _smooth_noise(rng, (b1 - b0, w), (30, 3))
    grey[b0:b1] = belt
    grey[b0 - 4:b0] = 150                                       # rails
    grey[b1:b1 + 4] = 140
    grey[b1 + 4:] = 85 + 8 * _smooth_noise(rng, (h - b1 - 4, w), (12, 2))
    cast = rng.normal(1.0, 0.05, 3).astype(np.float32)
    img = grey[:, :, None] * cast[None, None, :]
    gain = rng.uniform(0.85, 1.15)
    xx = np.arange(w, dtype=np.float32)[None, :]
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    slope = rng.uniform(-0.15, 0.15)
    light = gain * (1 - 0.18 * r2) * (1 + slope * (xx - w / 2) / w)
    return np.clip(img * light[:, :, None], 0, 255).astype(np.uint8)


def _overlap(frame_hw: tuple[int, int], sprite_hw: tuple[int, int], x0: int, y0: int):
    """(frame slices, sprite slices) of a sprite with its top-left at (x0, y0); None when off-frame."""
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + sprite_hw[1], frame_hw[1]), min(y0 + sprite_hw[0], frame_hw[0])
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    return (slice(fy0, fy1), slice(fx0, fx1)), (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))


def _paste(frame: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend a sprite into ``frame`` (in place) with its top-left corner at (x0, y0)."""
    ov = _overlap(frame.shape[:2], alpha.shape, x0, y0)
    if ov is not None:
        fs, ss = ov
        a = alpha[ss][..., None]
        frame[fs] = (rgb[ss] * a + frame[fs] * (1 - a) + 0.5).astype(np.uint8)


def _silhouette(alpha: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Frame-sized 0/255 mask of the sprite's alpha > 0.5."""
    sil = np.zeros((HEIGHT, WIDTH), np.uint8)
    ov = _overlap(sil.shape, alpha.shape, x0, y0)
    if ov is not None:
        sil[ov[0]] = np.where(alpha[ov[1]] > 0.5, 255, 0)
    return sil


def _position(run: Run, k: int, width: int, t: int, camera: str) -> float:
    """Sprite centre x of pass ``k`` at frame ``t`` on ``camera``."""
    dx = -width / 2 + run.speed * (t - run.starts[k])
    return dx if CAMERA_DIRECTION[camera] > 0 else WIDTH - dx


# ----------------------------------------------------------------------------- writing

def _schedule(run: Run, camera: str, widths: list[int]) -> tuple[np.ndarray, dict[int, int]]:
    """The pass shown at each frame (-1: empty belt) and each pass's centre frame on ``camera``."""
    active, centres = np.full(run.n_frames, -1), {}
    for k, w in enumerate(widths):
        ts = np.arange(run.starts[k], run.starts[k] + _pass_frames(w, run.speed))
        active[ts] = k
        dist = [abs(_position(run, k, w, t, camera) - WIDTH / 2) for t in ts]
        centres[k] = int(ts[int(np.argmin(dist))])
    return active, centres


def _render_video(run: Run, camera: str, seed: int, path: Path, sil_dir: Path) -> list[tuple]:
    """Write one camera's video of ``run``; return its truth box rows."""
    cam_idx = CAMERAS.index(camera)
    rng = np.random.default_rng([seed, 303, run.index, cam_idx])
    bg = _background(rng)
    light = float(rng.uniform(-0.6, 0.6))
    write = NoisyWriter(path, rng, run.n_frames)
    sprites = [render_sprite(p, camera, light) for p in run.products]
    active, centres = _schedule(run, camera, [alpha.shape[1] for _, alpha in sprites])
    boxes = []
    with write:
        for t in range(run.n_frames):
            frame = bg.copy()
            k = int(active[t])
            if k >= 0:
                p, (rgb, alpha) = run.products[k], sprites[k]
                h, w = alpha.shape
                x0 = int(round(_position(run, k, w, t, camera) - w / 2))
                y0 = p.y_base - h
                _paste(frame, rgb, alpha, x0, y0)
                box = _clip_box(alpha, x0, y0)
                if box is not None:
                    boxes.append((run.name, camera, k, t, *box, t == centres[k]))
                if t == centres[k]:
                    write_image(sil_dir / f"{run.name}_{camera}_{k:03d}.png", _silhouette(alpha, x0, y0))
            write(t, frame)
    return boxes


class NoisyWriter:
    """An MJPG video of ``WIDTH x HEIGHT`` frames with the camera's sensor noise added to each (a seeded
    noise field, shifted per frame); ``with w: w(t, frame)``. The noise is drawn from ``rng`` here."""

    def __init__(self, path: Path, rng: np.random.Generator, n_frames: int):
        self.path = path
        self.noise = rng.normal(0, rng.uniform(2.5, 4.0), (HEIGHT + 32, WIDTH + 32, 3)).astype(np.int16)
        self.offsets = rng.integers(0, 32, (n_frames, 2))
        self.writer = None

    def __enter__(self):
        self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
        if not self.writer.isOpened():
            raise OSError(f"{self.path}: OpenCV cannot open an MJPG video writer")
        return self

    def __call__(self, t: int, frame: np.ndarray) -> None:
        oy, ox = self.offsets[t]
        self.writer.write(cv2.add(frame, self.noise[oy:oy + HEIGHT, ox:ox + WIDTH], dtype=cv2.CV_8U))

    def __exit__(self, *exc) -> None:
        self.writer.release()


def _clip_box(alpha: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int] | None:
    """Frame box (x0, y0, x1, y1; x1/y1 exclusive) of the sprite's alpha > 0.5, clipped; None if off-frame."""
    ys, xs = np.nonzero(alpha > 0.5)
    bx0, bx1 = max(x0 + xs.min(), 0), min(x0 + xs.max() + 1, WIDTH)
    by0, by1 = max(y0 + ys.min(), 0), min(y0 + ys.max() + 1, HEIGHT)
    if bx0 >= bx1 or by0 >= by1:
        return None
    return int(bx0), int(by0), int(bx1), int(by1)


def _tables(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    videos = pd.DataFrame([
        {"video": f"videos/{r.name}_{c}.avi", "camera": c, "run": r.name, "split": r.split}
        for r in runs for c in CAMERAS])
    passes = pd.DataFrame([
        {"run": p.run, "pass_index": p.pass_index, "product_id": p.product_id, "label": p.label,
         "defect_type": p.defect_type or "", "split": p.split, "defect_cameras": ";".join(p.defect_cameras())}
        for r in runs for p in r.products])
    return videos, passes


def generate(out_dir: Path, size: str = "small", seed: int = 0, kind: str = "cameras") -> dict:
    """Write a demo videos folder to ``out_dir`` (replaced atomically); return the demo.json content.

    ``kind``: ``cameras`` (this module: one product at a time, four cameras) or ``streams``
    (``demo_streams.py``: continuous streams, several products in view).
    """
    if kind == "streams":
        from defectflow.sources.demo_streams import generate_streams
        return generate_streams(out_dir, size=size, seed=seed)
    if kind != "cameras":
        raise DefectflowError(f"demo kind must be cameras or streams, got {kind!r}")
    t0 = time.perf_counter()
    runs = plan(size, seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "videos").mkdir()
        (tmp / "truth" / "silhouettes").mkdir(parents=True)
        boxes = []
        for run in runs:
            for cam in CAMERAS:
                boxes += _render_video(run, cam, seed, tmp / "videos" / f"{run.name}_{cam}.avi",
                                       tmp / "truth" / "silhouettes")
        videos, passes = _tables(runs)
        videos.to_csv(tmp / "videos.csv", index=False)
        passes.to_csv(tmp / "passes.csv", index=False)
        pd.DataFrame(boxes, columns=["run", "camera", "pass_index", "frame_index", "x0", "y0", "x1", "y1",
                                     "is_center"]).to_csv(tmp / "truth" / "boxes.csv", index=False)
        info = _summary(runs, size, seed)
        (tmp / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    info["seconds"] = round(time.perf_counter() - t0, 2)   # not in demo.json: keeps it deterministic
    return info


def _summary(runs: list[Run], size: str, seed: int) -> dict:
    products = [p for r in runs for p in r.products]
    by_split = {}
    for split in ("train", "val", "test"):
        ps = [p for p in products if p.split == split]
        by_split[split] = {"runs": sum(r.split == split for r in runs), "products": len(ps),
                           "defective": sum(p.label == "defect" for p in ps)}
    return {
        "kind": "cameras", "size": size, "seed": seed, "width": WIDTH, "height": HEIGHT, "fps": FPS, "cameras": list(CAMERAS),
        "counts": {"runs": len(runs), "videos": len(runs) * len(CAMERAS), "products": len(products),
                   "defective": sum(p.label == "defect" for p in products),
                   "passes": len(products) * len(CAMERAS), "frames": sum(r.n_frames for r in runs) * len(CAMERAS)},
        "splits": by_split,
        "runs": [{"run": r.name, "split": r.split, "products": len(r.products), "frames": r.n_frames,
                  "speed_px_per_frame": round(r.speed, 3)} for r in runs],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the synthetic multi-camera demo videos.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--streams", action="store_true", help="continuous product streams (demo_streams.py)")
    a = ap.parse_args(argv)
    info = generate(a.out_dir, a.size, a.seed, kind="streams" if a.streams else "cameras")
    print(json.dumps({"out_dir": str(a.out_dir), **info["counts"], "seconds": info["seconds"]}))


if __name__ == "__main__":
    main()
