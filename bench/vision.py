"""Figures of the vision front-end (issues 3 and 10: frames, detect, masks, roi, streams), one JSON line.

    python bench/vision.py                     (from the repo root, in the project's venv)
    python bench/vision.py --work /tmp/vis     (keep the outputs: demo, frames, detect, masks, streams)

The default work folder is a temp folder in RAM (/dev/shm where there is one): on the 2-core VM
creating a file costs about 1 ms of CPU (``file_create_ms_disk``, measured here), more than decoding a
demo frame, and the frames stage writes one per kept frame; in RAM the speed ratios measure the
stage's own work (``file_create_ms_work``: the work folder's cost).

- streams (bench/vision_streams.py): the stream demo (touching products, stop-and-go, two lanes in
  perspective; 264 passes): ``stream_passes_expected`` / ``_found``, ``stream_misses``,
  ``stream_duplicates``, ``stream_id_switches``, ``stream_centre_frame_err_max`` (+ ``_strict``),
  ``stream_frames_vs_decode_ratio``, a contact sheet of captures at bench/out/stream_captures.png;
- frames / detect (``measure_video`` of bench/vision_video.py, which generates the small demo
  into ``<work>/demo`` and runs frames + detect on it): passes_expected, passes_found,
  real_clip_captures, box_iou_median, box_misses, frames_vs_decode_ratio, ...
- masks (bench/vision_masks.py) on those detect crops, ``masks`` params from params.yaml:
  ``mask_iou`` = the composite BEFORE the shrink vs the true silhouette mapped through each
  window crop (mean over product x camera; target >= 0.9), ``mask_iou_shrunk`` = the applied
  (shrunk by masks.shrink, padded) composite vs the same (about (1 - shrink)^2 by construction),
  ``background_leak`` = share of the pixels kept by the applied mask that are background
  (target < 2%), ``background_leak_of_bg`` = share of the crop's background left in.
- roi (bench/vision_roi.py): ``circle_center_err_rel`` = largest centre error / true radius over
  generated round parts (target <= 0.02; mean and p95 beside it), ``bottle_circle_found_rate`` on
  ../shared/datasets/mvtec/bottle (all 292 images) with the radius spread, and a contact sheet of
  16 results at bench/out/bottle_circles.png (image + circle, ROI after CLAHE, k-means mask).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from defectflow import masks  # noqa: E402
from defectflow.config import Params, SourceParams, load_params  # noqa: E402
from vision_masks import measure_masks  # noqa: E402
from vision_roi import measure_bottle, measure_synthetic_circles  # noqa: E402
from vision_streams import measure_streams  # noqa: E402

try:                                    # frames / detect figures (another module of issue 3)
    from vision_video import measure_video  # noqa: E402
except ImportError:                     # not there yet: frames + detect run here, video keys None
    measure_video = None

BOTTLE = ROOT.parent / "shared" / "datasets" / "mvtec" / "bottle"
SHEET = ROOT / "bench" / "out" / "bottle_circles.png"
VIDEO_KEYS = ("passes_expected", "passes_found", "real_clip_captures", "box_iou_median",
              "box_misses", "frames_vs_decode_ratio")


def _frames_detect(work: Path, base: Params) -> dict:
    """Fallback when bench/vision_video.py is missing: small demo -> frames -> detect, no figures."""
    from defectflow import detect, frames
    from defectflow.sources import demo
    if not (work / "demo" / "videos.csv").exists():
        demo.generate(work / "demo", size="small", seed=0)
    frames.run(base, work / "demo", work / "frames")
    detect.run(base, work / "frames", work / "detect")
    return {k: None for k in VIDEO_KEYS}


def file_create_ms(folder: Path, n: int = 100, size: int = 15000) -> float:
    """CPU ms to create one file of ``size`` bytes in ``folder`` (mean of ``n``)."""
    folder = Path(tempfile.mkdtemp(prefix="probe_", dir=folder))
    data = os.urandom(size)
    t = time.process_time()
    for i in range(n):
        (folder / f"f{i}.jpg").write_bytes(data)
    ms = (time.process_time() - t) / n * 1000
    shutil.rmtree(folder, ignore_errors=True)
    return round(ms, 3)


def measure(work: Path, bottle: Path = BOTTLE) -> dict:
    work = Path(work)
    res: dict = {"file_create_ms_work": file_create_ms(work), "file_create_ms_disk": file_create_ms(ROOT / "bench")}
    res.update(measure_streams(work))
    demo_dir = work / "demo"
    base = Params(source=SourceParams(kind="demo", path=str(demo_dir), demo_size="small"))
    if measure_video is not None:
        res.update(measure_video(work))
    else:
        res.update(_frames_detect(work, base))
    yaml_masks = load_params(ROOT / "params.yaml").masks if (ROOT / "params.yaml").is_file() else base.masks
    mparams = base.model_copy(update={"masks": yaml_masks.model_copy(update={"method": "mask"})})
    t = time.perf_counter()
    masks.run(mparams, work / "detect", work / "masks")
    res["masks_s"] = round(time.perf_counter() - t, 2)
    res.update(measure_masks(demo_dir, work / "detect", work / "masks", margin=mparams.detect.margin))
    res.update(measure_synthetic_circles(n=60, seed=0))
    if bottle.is_dir():
        t = time.perf_counter()
        res.update(measure_bottle(bottle, SHEET))
        res["bottle_s"] = round(time.perf_counter() - t, 2)
    else:
        res["bottle_circle_found_rate"] = None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="keep outputs here (default: a temp folder)")
    ap.add_argument("--bottle", default=str(BOTTLE), help="MVTec bottle folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(Path(args.work), Path(args.bottle))))
        return
    ram = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="vision_", dir=ram if ram.is_dir() else None) as tmp:
        print(json.dumps(measure(Path(tmp), Path(args.bottle))))


if __name__ == "__main__":
    main()
