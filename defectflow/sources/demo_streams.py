"""Continuous product streams (``source.demo_kind: streams``): several products in view at once.

What real lines look like, with ground truth. One camera per run, 320 x 240 at 25 fps, the
demo's bottles and jars (``demo_render.py``) on a noisy belt:

- ``dense`` (camera ``belt``): one belt at constant speed, identical products (bottles or jars,
  +-3% in size) at random gaps, about a third of them touching the one ahead; two to four in view.
- ``stopgo`` (camera ``belt``): the same on a stop-and-go belt: it runs, stops for up to a
  second, sometimes backs up a little first, and starts again.
- ``lanes`` (camera ``lanes``): two belts seen in perspective, each its own speed and
  direction: ``near`` along the bottom, ``far`` higher up, tilted, its products smaller and
  shrinking as they go away. :func:`frames_params` gives the matching ``frames`` params.

The direction of travel alternates between runs (``frames.direction: auto`` finds it). Files as
the cameras demo (ARCHITECTURE.md, "Demo data format") plus a ``lane`` column in ``passes.csv`` and
``truth/boxes.csv``; the truth centre frame of a pass is the frame nearest the first crossing of
the product's centre over its lane's counting line (through the lane's centre, across the travel).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.errors import DefectflowError
from defectflow.fsutil import atomic_dir, write_image
from defectflow.sources.demo import (DEFECT_SHARE, DEFECT_TYPES, FPS, HEIGHT, WIDTH, _background, _clip_box,
                                     NoisyWriter,
                                     _paste, _plan_products, _silhouette, _smooth_noise)
from defectflow.sources.demo_render import Product, render_sprite
from defectflow.sources.videos import DEFAULT_LANE

# (scene, products per lane) per split
STREAM_SIZES = {
    "tiny": {"train": [("dense", 10)], "val": [("stopgo", 8)], "test": [("lanes", 6)]},
    "small": {"train": [("dense", 36), ("stopgo", 36)], "val": [("lanes", 30)],
              "test": [("dense", 36), ("stopgo", 36), ("lanes", 30)]},
}
SCENE_CAMERA = {"dense": "belt", "stopgo": "belt", "lanes": "lanes"}
TOUCHING = 0.35            # share of products touching the one ahead
GAP_PX = (6, 60)           # gap between the others (silhouette to silhouette, px)
SPEED = (6.0, 9.0)         # belt speed, px per frame
SCALE_QUANTUM = 0.02       # far-lane sprites are re-rendered per step of scale
RENDER_CAMERA = "cam0"     # the product side the stream camera sees (defect visibility)
KINDS = ("bottle", "jar")
MOTION_THRESHOLD = 20      # frames.motion_threshold for these scenes (see frames_params)
BELT_REGION = (0.0, 0.2, 1.0, 0.86)   # frames.region of camera belt: the belt and the products on it

# two lanes seen in perspective (fractions of the frame); the far belt is tilted
FAR_BELT = (100.0, 92.0)   # far belt centre line y at x = 0 and x = WIDTH
FAR_SCALE = (0.58, 0.46)   # far products' scale at x = 0 and x = WIDTH (smaller further away)
NEAR_BASE, NEAR_SCALE = 214, 0.66
LANES = {
    "near": {"region": [[0.0, 0.5], [1.0, 0.5], [1.0, 0.97], [0.0, 0.97]], "direction": 1, "speed": (6.0, 8.0)},
    "far": {"region": [[0.0, 0.1], [1.0, 0.06], [1.0, 0.44], [0.0, 0.47]], "direction": -1, "speed": (3.5, 5.0)},
}


def frames_params() -> dict:
    """The ``frames`` params section for the stream demo: the belt's region (camera ``belt``), the two
    lanes of the ``lanes`` camera, and a motion threshold of 20 (the default 25 loses the shaded side
    of the products on the dark belt)."""
    return {"motion_threshold": MOTION_THRESHOLD, "region": list(BELT_REGION),
            "lanes": [{"name": name, "region": spec["region"], "cameras": [SCENE_CAMERA["lanes"]]}
                      for name, spec in LANES.items()]}


@dataclass
class _Lane:
    name: str
    direction: int                      # +1 left to right, -1 right to left
    products: list[Product]
    offsets: np.ndarray                 # belt position of each product's centre behind the first one
    belt: np.ndarray                    # belt travel so far at each frame (px)
    line_x: float                       # counting line (x of the lane's centre)


@dataclass
class _StreamRun:
    name: str
    split: str
    scene: str
    camera: str
    index: int
    n_frames: int
    lanes: list[_Lane]


def _scale_at(lane: str, x: float, base_scale: float) -> float:
    """A product's scale at image x: the far lane's shrink with distance (linear in x), quantised."""
    if lane != "far":
        return base_scale
    a, b = FAR_SCALE
    s = a + (b - a) * np.clip(x / WIDTH, 0, 1)
    return base_scale / a * round(float(s) / SCALE_QUANTUM) * SCALE_QUANTUM


def _perspective_x(u: float) -> float:
    """Image x of belt position ``u`` (px at the far lane's nearest scale) in perspective: dx/du = s(x) / s(0)."""
    a, b = FAR_SCALE
    k = (b - a) / WIDTH
    return a / k * (np.exp(k * u / a) - 1.0)


def _perspective_u(x: float) -> float:
    a, b = FAR_SCALE
    k = (b - a) / WIDTH
    return a / k * np.log1p(k * x / a)


def _base_y(lane: str, x: float, p: Product) -> int:
    if lane == "far":
        a, b = FAR_BELT
        return int(round(a + (b - a) * np.clip(x / WIDTH, 0, 1) + 4))
    if lane == "near":
        return NEAR_BASE + (p.y_base % 5)
    return p.y_base


def _speeds(scene: str, rng: np.random.Generator, speed: float, n: int) -> np.ndarray:
    """Belt speed per frame (px): constant, or stop-and-go with ramps and short reverses."""
    if scene != "stopgo":
        return np.full(n, speed)
    out: list[float] = []
    while len(out) < n:
        out += list(np.linspace(0, speed, 5)) + [speed] * int(rng.integers(20, 50))
        out += list(np.linspace(speed, 0, 5))
        if rng.random() < 0.4:                                  # backs up a little
            out += [-float(rng.uniform(1.0, 2.0))] * int(rng.integers(3, 7))
        out += [0.0] * int(rng.integers(8, 26))
    return np.array(out[:n])


def _plan_lane(run: str, split: str, lane: str, n: int, rng: np.random.Generator, defects: list[str],
               scene: str, speed: float, direction: int, line_x: float, max_frames: int) -> _Lane:
    prefix = run if lane == DEFAULT_LANE else f"{run}-{lane}"
    kind = KINDS[int(rng.integers(len(KINDS)))]           # identical parts: one kind per belt, +-3% in size
    products = [dataclasses.replace(p, kind=kind, scale=1.0 + (p.scale - 1.0) / 2)
                for p in _plan_products(prefix, split, n, rng, defects)]
    if lane == "near":
        products = [dataclasses.replace(p, scale=p.scale * NEAR_SCALE) for p in products]
    elif lane == "far":                    # sizes and gaps at the lane's nearest end (scale FAR_SCALE[0])
        products = [dataclasses.replace(p, scale=p.scale * FAR_SCALE[0]) for p in products]
    widths = [render_sprite(p, RENDER_CAMERA, 0.0)[1].shape[1] - 4 for p in products]   # silhouette width
    offsets = [0.0]
    for k in range(1, n):
        gap = 0.0 if rng.random() < TOUCHING else float(rng.uniform(*GAP_PX))
        offsets.append(offsets[-1] + (widths[k - 1] + widths[k]) / 2 + gap)
    speeds = _speeds(scene, rng, speed, max_frames)
    belt = np.concatenate([[0.0], np.cumsum(speeds)])[:max_frames]
    return _Lane(lane, direction, products, np.array(offsets), belt, line_x)


def _x(lane: _Lane, k: int, t: int) -> float:
    """Image x of product k's centre at frame t (it starts just outside the view)."""
    u = -40.0 + lane.belt[t] - lane.offsets[k]
    if lane.name == "far":                 # perspective: positions (and speeds) shrink with distance
        return _perspective_x(u) if lane.direction > 0 else _perspective_x(_perspective_u(WIDTH) - u)
    return u if lane.direction > 0 else WIDTH - u


def plan_streams(size: str = "small", seed: int = 0) -> list[_StreamRun]:
    """Runs, products and belt motion of the stream demo (deterministic in ``seed``)."""
    if size not in STREAM_SIZES:
        raise DefectflowError(f"demo size must be one of {sorted(STREAM_SIZES)}, got {size!r}")
    runs: list[_StreamRun] = []
    max_frames = 4000
    for s_idx, (split, scenes) in enumerate(STREAM_SIZES[size].items()):
        for r, (scene, n) in enumerate(scenes):
            name = f"{split}-{scene}-{r:02d}"
            rng = np.random.default_rng([seed, 404, s_idx, r])
            n_def = 0 if split == "train" else max(1, int(DEFECT_SHARE * n + 0.5))
            lanes = []
            specs = LANES.items() if scene == "lanes" else [(DEFAULT_LANE, {"direction": 1 if r % 2 == 0 else -1,
                                                                             "speed": SPEED, "region": None})]
            for lane, spec in specs:
                types = [DEFECT_TYPES[int(i) % 4] for i in rng.permutation(n_def)]
                region = np.array(spec["region"] or [[0, 0], [1, 0], [1, 1], [0, 1]], float) * (WIDTH, HEIGHT)
                m = cv2.moments(region.astype(np.float32))
                lanes.append(_plan_lane(name, split, lane, n, rng, types, scene, float(rng.uniform(*spec["speed"])),
                                        spec["direction"], m["m10"] / m["m00"], max_frames))
            n_frames = max(int(np.searchsorted(ln.belt, ln.offsets[-1] + WIDTH + 120)) + 1 for ln in lanes)
            if n_frames >= max_frames:
                raise DefectflowError(f"stream demo run {name}: longer than {max_frames} frames")
            runs.append(_StreamRun(name, split, scene, SCENE_CAMERA[scene], len(runs), n_frames, lanes))
    return runs


def _lanes_background(rng: np.random.Generator) -> np.ndarray:
    """The demo background with a second, tilted belt higher up (the far lane)."""
    img = _background(rng).astype(np.float32)
    belt = 58 + 6 * rng.standard_normal((HEIGHT, WIDTH)).astype(np.float32)
    belt = cv2.GaussianBlur(belt, (0, 0), 0.7) + 4 * _smooth_noise(rng, (HEIGHT, WIDTH), (30, 8))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    centre = FAR_BELT[0] + (FAR_BELT[1] - FAR_BELT[0]) * xx / WIDTH
    band = np.abs(yy - centre) < 9
    rail = (np.abs(yy - centre) >= 9) & (np.abs(yy - centre) < 11)
    img[band] = belt[band][:, None] * img[band] / np.maximum(img[band].mean(axis=1, keepdims=True), 1)
    img[rail] = 150
    return np.clip(img, 0, 255).astype(np.uint8)


def _crossing_frame(lane: _Lane, k: int, n_frames: int) -> int | None:
    """Frame nearest the first crossing of product k's centre over the counting line, in the direction of travel."""
    s = np.array([lane.direction * (_x(lane, k, t) - lane.line_x) for t in range(n_frames)])
    after = np.nonzero((s[1:] >= 0) & (s[:-1] < 0))[0]
    if not len(after):
        return None
    t1 = int(after[0]) + 1
    return t1 - 1 if abs(s[t1 - 1]) < abs(s[t1]) else t1


def _render_run(run: _StreamRun, seed: int, path: Path, sil_dir: Path) -> list[tuple]:
    """Write one run's video; return its truth box rows."""
    rng = np.random.default_rng([seed, 505, run.index])
    bg = _lanes_background(rng) if run.scene == "lanes" else _background(rng)
    light = float(rng.uniform(-0.6, 0.6))
    write = NoisyWriter(path, rng, run.n_frames)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    centres = {(ln.name, k): _crossing_frame(ln, k, run.n_frames) for ln in run.lanes for k in range(len(ln.products))}
    boxes = []
    with write:
        for t in range(run.n_frames):
            frame = bg.copy()
            for ln in run.lanes:
                for k, p in enumerate(ln.products):
                    x = _x(ln, k, t)
                    if not -80 < x < WIDTH + 80:
                        continue
                    scale = _scale_at(ln.name, x, p.scale)
                    key = (ln.name, k, scale)
                    if key not in cache:
                        cache[key] = render_sprite(dataclasses.replace(p, scale=scale), RENDER_CAMERA, light)
                    rgb, alpha = cache[key]
                    h, w = alpha.shape
                    x0, y0 = int(round(x - w / 2)), _base_y(ln.name, x, p) - h
                    _paste(frame, rgb, alpha, x0, y0)
                    box = _clip_box(alpha, x0, y0)
                    centre = centres[(ln.name, k)] == t
                    if box is not None:
                        boxes.append((run.name, run.camera, ln.name, k, t, *box, centre))
                    if centre:
                        write_image(sil_dir / f"{run.name}_{run.camera}_{ln.name}_{k:03d}.png",
                                    _silhouette(alpha, x0, y0))
            write(t, frame)
    return boxes


def _tables(runs: list[_StreamRun]) -> tuple[pd.DataFrame, pd.DataFrame]:
    videos = pd.DataFrame([{"video": f"videos/{r.name}_{r.camera}.avi", "camera": r.camera, "run": r.name,
                            "split": r.split} for r in runs])
    passes = pd.DataFrame([
        {"run": r.name, "pass_index": k, "product_id": p.product_id, "label": p.label,
         "defect_type": p.defect_type or "", "split": p.split,
         "defect_cameras": r.camera if p.sees_defect(RENDER_CAMERA) else "", "lane": ln.name}
        for r in runs for ln in r.lanes for k, p in enumerate(ln.products)])
    return videos, passes


def generate_streams(out_dir: Path, size: str = "small", seed: int = 0) -> dict:
    """Write the stream demo to ``out_dir`` (replaced atomically); return the demo.json content."""
    t0 = time.perf_counter()
    runs = plan_streams(size, seed)
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "videos").mkdir()
        (tmp / "truth" / "silhouettes").mkdir(parents=True)
        boxes = []
        for run in runs:
            boxes += _render_run(run, seed, tmp / "videos" / f"{run.name}_{run.camera}.avi",
                                 tmp / "truth" / "silhouettes")
        videos, passes = _tables(runs)
        videos.to_csv(tmp / "videos.csv", index=False)
        passes.to_csv(tmp / "passes.csv", index=False)
        pd.DataFrame(boxes, columns=["run", "camera", "lane", "pass_index", "frame_index", "x0", "y0", "x1", "y1",
                                     "is_center"]).to_csv(tmp / "truth" / "boxes.csv", index=False)
        n_products = sum(len(ln.products) for r in runs for ln in r.lanes)
        info = {"kind": "streams", "size": size, "seed": seed, "width": WIDTH, "height": HEIGHT, "fps": FPS,
                "frames_params": frames_params(),
                "counts": {"runs": len(runs), "videos": len(runs), "products": n_products, "passes": n_products,
                           "defective": int((passes["label"] == "defect").sum()),
                           "frames": sum(r.n_frames for r in runs)},
                "runs": [{"run": r.name, "split": r.split, "scene": r.scene, "camera": r.camera,
                          "frames": r.n_frames, "lanes": {ln.name: len(ln.products) for ln in r.lanes}}
                         for r in runs]}
        (tmp / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info
