"""Figures of the frames stage on continuous product streams (issue 10), one JSON line.

    python bench/vision_streams.py [--size small|tiny] [--work DIR]

``measure_streams(work)`` (also called by bench/vision.py) generates the stream demo
(``defectflow/sources/demo_streams.py``: touching products, a stop-and-go belt, two lanes in
perspective) into ``work/streams`` and runs the frames stage on it with ``frames`` params from
``demo_streams.frames_params()`` (everything else the defaults, ``frames.direction: auto``):

- ``stream_passes_expected`` / ``stream_passes_found``: true product passes (one per product per
  lane) vs captures; each capture is matched to the true product whose box at the capture's centre
  frame overlaps its track box most (IoU >= 0.3). ``stream_misses``: true passes without a
  capture; ``stream_duplicates``: captures beyond the first of a product, plus captures of no product;
  ``stream_order_errors``: captures whose pass index (hence product id and label) is not the true one;
- ``stream_centre_frame_err_max`` / ``_mean``: frames between the capture's centre frame and the
  true one, where every frame in which the product's true centre is within ``CENTRE_TOL_PX`` of
  where it is at the true centre frame counts as the true one (a product that stops or backs up at
  the line is there in several frames); ``..._strict``: plain |capture - true centre frame|;
- ``stream_id_switches``: over every tracked frame, each true product is matched to a track
  (IoU >= 0.3); a change of that track along the product's life is one switch;
- ``stream_frames_vs_decode_ratio``: frames stage wall time / a bare ``cv2.VideoCapture`` read loop
  over the same files in the same run (bare before and after, their mean), ``..._cpu`` in CPU time;
  the median of RATIO_ROUNDS such rounds (all of them in ``..._rounds``);
- ``stream_by_scene``: misses / duplicates / passes per scene (dense, stopgo, lanes).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from defectflow.config import Params, SourceParams, params_from_dict  # noqa: E402
from defectflow.manifest import FRAMES, read_manifest  # noqa: E402
from defectflow.sources import demo_streams  # noqa: E402
from defectflow.sources.videos import load_videos  # noqa: E402
from defectflow.stage import manifest_path  # noqa: E402
from vision_video import _bare_decode, _frames_ratio, _iou  # noqa: E402

MATCH_IOU = 0.3
RATIO_ROUNDS = 3           # speed: bare / stage / bare rounds, the median reported (a shared 2-core box is noisy)
CENTRE_TOL_PX = 2.0
SHEET = ROOT / "bench" / "out" / "stream_captures.png"


def stream_params(src: Path) -> Params:
    """Default params with the stream demo's lanes and source."""
    base = params_from_dict({"frames": demo_streams.frames_params()})
    return base.model_copy(update={"source": SourceParams(kind="demo", path=str(src), demo_kind="streams")})


def _best(truth: pd.DataFrame, box) -> tuple[int | None, float]:
    best, best_iou = None, 0.0
    for r in truth.itertuples():
        v = _iou(box, (r.x0, r.y0, r.x1, r.y1))
        if v > best_iou:
            best, best_iou = int(r.pass_index), v
    return (best, best_iou) if best_iou >= MATCH_IOU else (None, best_iou)


def capture_figures(truth: pd.DataFrame, df: pd.DataFrame) -> dict:
    """Misses, duplicates, order errors and centre-frame errors of the captures in FRAMES ``df``."""
    tframe = truth.set_index(["run", "camera", "lane", "frame_index"]).sort_index()
    tcentre = truth[truth["is_center"]].set_index(["run", "camera", "lane", "pass_index"])["frame_index"]
    at_line = _frames_at_line(truth)
    centres = df[df["is_center"]]
    seen: dict[tuple, int] = {}
    errs, strict, dup, order = [], [], 0, 0
    for c in centres.itertuples():
        key = (c.run, c.camera, c.lane, int(c.frame_index))
        cand = tframe.loc[[key]].reset_index() if key in tframe.index else tframe.iloc[:0].reset_index()
        k, _ = _best(cand, (c.track_x0, c.track_y0, c.track_x1, c.track_y1))
        if k is None:
            dup += 1
            continue
        pkey = (c.run, c.camera, c.lane, k)
        seen[pkey] = seen.get(pkey, 0) + 1
        dup += seen[pkey] > 1
        order += int(c.pass_index) != k
        strict.append(abs(int(c.frame_index) - int(tcentre.loc[pkey])))
        errs.append(min(abs(int(c.frame_index) - f) for f in at_line[pkey]))
    misses = sum(key not in seen for key in tcentre.index)
    return {"passes_expected": int(len(tcentre)), "passes_found": int(len(centres)), "misses": int(misses),
            "duplicates": int(dup), "order_errors": int(order),
            "centre_frame_err_max": int(max(errs)) if errs else None,
            "centre_frame_err_mean": round(float(np.mean(errs)), 3) if errs else None,
            "centre_frame_err_max_strict": int(max(strict)) if strict else None}


def _frames_at_line(truth: pd.DataFrame) -> dict[tuple, list[int]]:
    """Per true pass: the frames where its centre is within CENTRE_TOL_PX of where it is at its true
    centre frame (a product that stops or backs up at the line is there in several; the demo's belts
    run along x)."""
    out = {}
    for key, g in truth.groupby(["run", "camera", "lane", "pass_index"]):
        cx = ((g["x0"] + g["x1"]) / 2).to_numpy()
        at = cx[g["is_center"].to_numpy()][0]
        out[key] = [int(f) for f in g["frame_index"].to_numpy()[np.abs(cx - at) <= CENTRE_TOL_PX]]
    return out


def id_switches(truth: pd.DataFrame, df: pd.DataFrame) -> int:
    """Changes of the track matched to each true product over its tracked frames (see the module doc)."""
    switches = 0
    for (run, camera), rows in df.groupby(["run", "camera"]):
        log = pd.read_parquet(rows["tracks_path"].iloc[0])
        t = truth[(truth["run"] == run) & (truth["camera"] == camera)]
        t = t[t["frame_index"].isin(set(log["frame_index"]))]
        tl = {k: g for k, g in log.groupby(["frame_index", "lane"])}
        last: dict[tuple, int] = {}
        for (f, lane), g in t.groupby(["frame_index", "lane"]):
            tracks = tl.get((f, lane))
            if tracks is None:
                continue
            pairs = sorted(((_iou((a.x0, a.y0, a.x1, a.y1), (b.x0, b.y0, b.x1, b.y1)), int(a.pass_index),
                             int(b.track_id)) for a in g.itertuples() for b in tracks.itertuples()), reverse=True)
            used_p, used_t = set(), set()
            for v, p, tid in pairs:
                if v < MATCH_IOU or p in used_p or tid in used_t:
                    continue
                used_p.add(p)
                used_t.add(tid)
                prev = last.get((lane, p))
                switches += prev is not None and prev != tid
                last[(lane, p)] = tid
    return switches


def measure_streams(work: Path, size: str = "small", seed: int = 0) -> dict:
    work = Path(work)
    src = work / "streams"
    if not (src / "videos.csv").exists():
        demo_streams.generate_streams(src, size=size, seed=seed)
    paths = list(load_videos(src)["path"])
    _bare_decode(paths[:1])                                         # warm the page cache / codec
    params = stream_params(src)
    rounds = [_frames_ratio(params, src, work / "stream_frames", paths) for _ in range(RATIO_ROUNDS)]
    ratio = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]          # the median round
    df = read_manifest(manifest_path(work / "stream_frames"), FRAMES)
    truth = pd.read_csv(src / "truth" / "boxes.csv")
    figs = capture_figures(truth, df)
    res = {f"stream_{k}": v for k, v in figs.items()}
    res["stream_id_switches"] = id_switches(truth, df)
    res.update({"stream_frames_vs_decode_ratio": ratio["ratio"], "stream_frames_vs_decode_ratio_cpu": ratio["ratio_cpu"],
                "stream_frames_vs_decode_ratio_rounds": [r["ratio"] for r in rounds],
                "stream_frames_stage_s": ratio["stage_s"], "stream_bare_decode_s": ratio["bare_decode_s"]})
    scene_of = {r: r.split("-")[1] for r in truth["run"].unique()}
    by_scene = {}
    for scene in sorted(set(scene_of.values())):
        runs = [r for r, s in scene_of.items() if s == scene]
        f = capture_figures(truth[truth["run"].isin(runs)], df[df["run"].isin(runs)])
        by_scene[scene] = {k: f[k] for k in ("passes_expected", "misses", "duplicates", "centre_frame_err_max")}
    res["stream_by_scene"] = by_scene
    res["stream_sheet"] = contact_sheet(df, SHEET)
    return res


def contact_sheet(df: pd.DataFrame, path: Path, per_scene: int = 8) -> str:
    """Centre frames of the first captures of each stream scene (track box, lane, pass, track id)."""
    import cv2
    rows = []
    for scene in ("dense", "stopgo", "lanes"):
        centres = df[df["is_center"] & df["run"].str.contains(f"-{scene}-")].sort_values(["run", "frame_index"])
        tiles = []
        for c in centres.head(per_scene).itertuples():
            img = cv2.imread(c.image_path)
            cv2.rectangle(img, (int(c.track_x0), int(c.track_y0)), (int(c.track_x1) - 1, int(c.track_y1) - 1),
                          (0, 255, 255), 1)
            cv2.putText(img, f"{c.run} {c.lane} p{c.pass_index} #{c.track_id} f{c.frame_index}", (4, 14),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 255), 1, cv2.LINE_AA)
            tiles.append(img)
        if tiles:
            h, w = tiles[0].shape[:2]
            tiles += [np.zeros((h, w, 3), np.uint8)] * (per_scene - len(tiles))
            half = per_scene // 2
            rows.append(np.vstack([np.hstack(tiles[:half]), np.hstack(tiles[half:])]))     # two rows per scene
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return path.relative_to(ROOT).as_posix()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(demo_streams.STREAM_SIZES))
    ap.add_argument("--work", help="keep outputs here (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure_streams(Path(args.work), args.size)))
        return
    ram = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="vision_streams_", dir=ram if ram.is_dir() else None) as tmp:
        print(json.dumps(measure_streams(Path(tmp), args.size)))


if __name__ == "__main__":
    main()
