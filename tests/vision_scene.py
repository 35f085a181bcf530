"""Tiny generated inputs for the detect / masks / roi / augment / synth tests (not a test module).

A scene is one short MJPG video per camera: a filled ellipse crossing a noisy,
static, textured belt; the frames the frames stage would keep are decoded from
the video and listed in a FRAMES manifest. Paths are relative to the cwd (tests
chdir into tmp_path), like the pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.manifest import FRAMES, write_manifest

H, W = 120, 160
PRODUCT_BGR = (40, 170, 230)
AXES = (24, 17)                 # ellipse half-axes of the product, px
FRAMES_PER_PASS = 40


@dataclass
class Scene:
    inp: Path
    rows: pd.DataFrame
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)    # item_id -> true box
    silhouettes: dict[str, np.ndarray] = field(default_factory=dict)             # item_id -> 0/255 mask
    belt: np.ndarray | None = None


def belt(seed: int = 0) -> np.ndarray:
    """A static, textured, noisy conveyor (BGR uint8)."""
    rng = np.random.default_rng(seed)
    tex = rng.normal(90, 18, (H, W, 3)).clip(0, 255).astype(np.uint8)
    tex = cv2.GaussianBlur(tex, (0, 0), 1.0)
    for x in range(0, W, 20):                            # belt slats
        tex[:, x:x + 2] = (60, 60, 60)
    return tex


def product_centre(t: int) -> tuple[int, int]:
    """Where the product is in frame ``t`` of its pass (enters left, leaves right)."""
    x = -AXES[0] - 5 + (W + 2 * AXES[0] + 10) * t / (FRAMES_PER_PASS - 1)
    return int(round(x)), H // 2 + 3


def render(bg: np.ndarray, centre: tuple[int, int] | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A frame (with sensor noise) and the product's 0/255 silhouette."""
    sil = np.zeros((H, W), np.uint8)
    if centre is not None:
        cv2.ellipse(sil, centre, AXES, 0, 0, 360, 255, -1)
    frame = bg.copy()
    frame[sil > 0] = PRODUCT_BGR
    noise = rng.normal(0, 4, frame.shape)
    return (frame + noise).clip(0, 255).astype(np.uint8), sil


def _box(sil: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(sil)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_scene(root: Path, n_passes: int = 2, window: int = 5, spread: bool = False,
               empty_frame: bool = True, camera: str = "cam0") -> Scene:
    """Write video + frame PNGs + FRAMES manifest under ``root`` (relative to cwd); return the truth."""
    video = root / "videos" / f"r1_{camera}.avi"
    video.parent.mkdir(parents=True, exist_ok=True)
    bg = belt()
    rng = np.random.default_rng(1)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    sils = []
    for p in range(n_passes):
        for t in range(FRAMES_PER_PASS):
            frame, sil = render(bg, product_centre(t), rng)
            writer.write(frame)
            sils.append((p, t, sil))
    for _ in range(10):                                   # empty belt at the end
        frame, sil = render(bg, None, rng)
        writer.write(frame)
        sils.append((None, None, sil))
    writer.release()

    centre_t = FRAMES_PER_PASS // 2
    if spread:
        keep_t = list(range(2, FRAMES_PER_PASS - 2, 3))
    else:
        keep_t = list(range(centre_t - window // 2, centre_t - window // 2 + window))
    wanted = {p * FRAMES_PER_PASS + t: (p, t) for p in range(n_passes) for t in keep_t}
    if empty_frame:
        wanted[n_passes * FRAMES_PER_PASS + 5] = (None, None)

    scene = Scene(inp=root / "frames", rows=pd.DataFrame(), belt=bg)
    records = []
    cap = cv2.VideoCapture(str(video))
    idx = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if idx in wanted:
            p, t = wanted[idx]
            item = f"r1_{camera}_f{idx:04d}"
            path = scene.inp / "images" / f"{item}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), frame)
            sil = sils[idx][2]
            if p is not None:
                scene.boxes[item] = _box(sil)
                scene.silhouettes[item] = sil
            records.append(dict(
                item_id=item, product_id=f"r1-p{p if p is not None else 99:03d}", run="r1", camera=camera,
                split="train", label="good", image_path=path.as_posix(), source="demo",
                video_path=video.as_posix(), frame_index=idx, pass_index=p if p is not None else 99,
                is_center=(t == centre_t), t_sec=idx / 10.0))
        idx += 1
    cap.release()
    scene.rows = pd.DataFrame(records)
    write_manifest(scene.rows, FRAMES, scene.inp / "manifest.parquet")
    return scene


def write_images(root: Path, images: list[np.ndarray], schema, **cols) -> pd.DataFrame:
    """Write ``images`` as PNGs plus a manifest of ``schema`` (one good train row each, images source).

    ``cols`` gives extra columns: a scalar for every row or a list (one value per row).
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for k, img in enumerate(images):
        path = root / "images" / f"im{k:02d}.png"
        cv2.imwrite(str(path), img)
        records.append(dict(item_id=f"im{k:02d}", product_id=f"p{k:02d}", run="folder", camera="cam0",
                            split="train", label="good", image_path=path.as_posix(), source="images",
                            is_center=True))
    df = pd.DataFrame(records)
    for name, value in cols.items():
        df[name] = value
    write_manifest(df, schema, root / "manifest.parquet")
    return df


def iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes, or of two boolean masks."""
    if isinstance(a, np.ndarray):
        a, b = a.astype(bool), b.astype(bool)
        return float((a & b).sum() / max(1, (a | b).sum()))
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)
