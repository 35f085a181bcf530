"""Figures of the frames and detect stages (issue 3), one JSON line.

    python bench/vision_video.py            (from the repo root, in the project's venv)

``measure_video(work)`` (also called by bench/vision.py):

- generates the small demo into ``work/demo`` and runs the frames stage on it:
  ``passes_expected`` (true product passes, all cameras) vs ``passes_found`` (centre frames
  kept), ``pass_count_mismatches`` (run/camera pairs whose count differs from the truth),
  ``centre_frame_err_max`` (|found - true| centre frame index);
- ``frames_vs_decode_ratio``: frames stage wall time / a bare ``cv2.VideoCapture`` read loop
  over the same files, same run (bare loop timed before and after the stage, their mean), with
  the default params (MJPG passthrough); ``frames_vs_decode_ratio_full_decode`` the same with
  ``frames.jpeg_passthrough: false`` (every frame decoded, kept frames written as PNG: the path
  non-MJPG videos such as the phone clip take); ``..._cpu`` the same ratios in process CPU time
  (less sensitive to other jobs on the machine);
- runs the classical detect stage on those frames: ``box_iou_median`` / ``box_iou_p10`` of the
  detected boxes vs the generator's true boxes (``truth/boxes.csv``) over every kept frame,
  ``box_misses`` = kept frames with no box or IoU < 0.5;
- real footage: the frames stage on ``../shared/videos/delta_robot_belt/conveyor_belt.mp4`` with
  ``examples/conveyor_belt/params.yaml`` (videos.csv written with the clip's absolute path):
  ``real_clip_captures`` (None when the clip is absent) and a contact sheet of the captures
  (``bench/out/conveyor_belt_captures.png``).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defectflow import detect, frames  # noqa: E402
from defectflow.config import FramesParams, Params, SourceParams, load_params  # noqa: E402
from defectflow.manifest import DETECT, FRAMES, read_manifest  # noqa: E402
from defectflow.sources import demo  # noqa: E402
from defectflow.sources.videos import load_videos  # noqa: E402
from defectflow.stage import manifest_path  # noqa: E402

CLIP = ROOT.parent / "shared" / "videos" / "delta_robot_belt" / "conveyor_belt.mp4"
EXAMPLE = ROOT / "examples" / "conveyor_belt" / "params.yaml"
SHEET = ROOT / "bench" / "out" / "conveyor_belt_captures.png"


def _bare_decode(paths: list[str]) -> int:
    n = 0
    for p in paths:
        cap = cv2.VideoCapture(p)
        while cap.read()[0]:
            n += 1
        cap.release()
    return n


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _frames_ratio(params: Params, src: Path, out: Path, paths: list[str]) -> dict:
    """Stage vs bare decode on the same files: bare, stage, bare (mean of the two bare runs)."""
    shutil.rmtree(out, ignore_errors=True)
    b1 = _timed(lambda: _bare_decode(paths))
    st = _timed(lambda: frames.run(params, src, out))
    b2 = _timed(lambda: _bare_decode(paths))
    bare_wall, bare_cpu = (b1[0] + b2[0]) / 2, (b1[1] + b2[1]) / 2
    return {"stage_s": round(st[0], 2), "bare_decode_s": round(bare_wall, 2),
            "ratio": round(st[0] / bare_wall, 2), "ratio_cpu": round(st[1] / bare_cpu, 2)}


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_figures(demo_dir: Path, frames_df: pd.DataFrame, detect_df: pd.DataFrame) -> dict:
    truth = pd.read_csv(demo_dir / "truth" / "boxes.csv").set_index(["run", "camera", "frame_index"])
    got = detect_df.set_index("item_id")
    ious, misses, n = [], 0, 0
    for row in frames_df.itertuples():
        key = (row.run, row.camera, int(row.frame_index))
        if key not in truth.index:
            continue
        n += 1
        t = truth.loc[key]
        if row.item_id not in got.index:
            misses += 1
            continue
        g = got.loc[row.item_id]
        v = _iou((g.box_x0, g.box_y0, g.box_x1, g.box_y1), (t.x0, t.y0, t.x1, t.y1))
        ious.append(v)
        misses += v < 0.5
    return {"box_iou_median": round(float(np.median(ious)), 4) if ious else None,
            "box_iou_p10": round(float(np.percentile(ious, 10)), 4) if ious else None,
            "box_misses": int(misses), "box_frames": n}


def _contact_sheet(df: pd.DataFrame, region, path: Path) -> None:
    """Centre frame of each capture (region outlined) above the pass's window strip."""
    tiles = []
    for pidx, g in df.groupby("pass_index"):
        g = g.sort_values("frame_index")
        centre = g[g["is_center"]].iloc[0]
        img = cv2.imread(centre["image_path"])
        h, w = img.shape[:2]
        if region:
            x0, y0, x1, y1 = region
            cv2.rectangle(img, (int(x0 * w), int(y0 * h)), (int(x1 * w) - 1, int(y1 * h) - 1), (0, 255, 255), 2)
        cv2.putText(img, f"pass {pidx}  frame {int(centre['frame_index'])}", (8, 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 255), 2)
        band = [cv2.imread(p) for p in g["image_path"]]
        if region:                                   # the window, cut to the region (the belt)
            band = [b[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] for b in band]
        band = [cv2.resize(b, (w, max(1, round(b.shape[0] * w / b.shape[1]))))
                for b in band]
        tiles.append(np.vstack([img, *band]))
    hmax = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, hmax - t.shape[0], 4, 4, cv2.BORDER_CONSTANT, value=0) for t in tiles]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.hstack(tiles))


def _real_clip(work: Path) -> dict:
    if not CLIP.is_file():
        return {"real_clip_captures": None, "real_clip_note": f"{CLIP} not found"}
    folder = work / "belt"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "videos.csv").write_text(f"video,camera,run,split\n{CLIP.as_posix()},cam0,belt-00,test\n")
    params = load_params(EXAMPLE)
    params = params.model_copy(update={"source": SourceParams(kind="videos", path=str(folder))})
    out = work / "belt_frames"
    t = time.perf_counter()
    frames.run(params, folder, out)
    secs = time.perf_counter() - t
    df = read_manifest(manifest_path(out), FRAMES)
    centres = df[df["is_center"]].sort_values("frame_index")
    _contact_sheet(df, params.frames.region, SHEET)
    return {"real_clip_captures": int(len(centres)),
            "real_clip_centre_frames": [int(i) for i in centres["frame_index"]],
            "real_clip_frames_s": round(secs, 2),
            "real_clip_sheet": SHEET.relative_to(ROOT).as_posix()}


def measure_video(work: Path) -> dict:
    """Frames + detect figures on the small demo (generated into ``work``) and the real clip."""
    work = Path(work)
    demo_dir = work / "demo"
    if not (demo_dir / "videos.csv").exists():
        demo.generate(demo_dir, size="small", seed=0)
    paths = list(load_videos(demo_dir)["path"])
    _bare_decode(paths[:2])                                        # warm the page cache / codec
    base = Params(source=SourceParams(kind="demo", path=str(demo_dir), demo_size="small"))
    full = base.model_copy(update={"frames": FramesParams(jpeg_passthrough=False)})
    r_full = _frames_ratio(full, demo_dir, work / "frames_full", paths)
    r_fast = _frames_ratio(base, demo_dir, work / "frames", paths)
    fdf = read_manifest(manifest_path(work / "frames"), FRAMES)

    truth = pd.read_csv(demo_dir / "truth" / "boxes.csv")
    tc = truth[truth["is_center"]]
    expected = tc.groupby(["run", "camera"]).size()
    found = fdf[fdf["is_center"]].groupby(["run", "camera"]).size().reindex(expected.index, fill_value=0)
    centres = fdf[fdf["is_center"]].merge(tc, on=["run", "camera", "pass_index"], suffixes=("", "_true"))
    res = {
        "passes_expected": int(expected.sum()),
        "passes_found": int(found.sum()),
        "pass_count_mismatches": int((found != expected).sum()),
        "centre_frame_err_max": int((centres["frame_index"] - centres["frame_index_true"]).abs().max()),
        "frames_vs_decode_ratio": r_fast["ratio"],
        "frames_vs_decode_ratio_cpu": r_fast["ratio_cpu"],
        "frames_vs_decode_ratio_full_decode": r_full["ratio"],
        "frames_vs_decode_ratio_full_decode_cpu": r_full["ratio_cpu"],
        "frames_stage_s": r_fast["stage_s"], "bare_decode_s": r_fast["bare_decode_s"],
    }
    t = time.perf_counter()
    detect.run(base, work / "frames", work / "detect")
    res["detect_s"] = round(time.perf_counter() - t, 2)
    ddf = read_manifest(manifest_path(work / "detect"), DETECT)
    res.update(_box_figures(demo_dir, fdf, ddf))
    res.update(_real_clip(work))
    return res


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="vision_video_") as tmp:
        print(json.dumps(measure_video(Path(tmp))))


if __name__ == "__main__":
    main()
