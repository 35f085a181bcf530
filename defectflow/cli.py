"""``defectflow`` command line: demo data, parameter check, run summary.

    defectflow demo [--size tiny|small] [--out DIR] [--streams]   write the synthetic demo videos
    defectflow check [params.yaml]                    validate parameters
    defectflow summary                                where the report and metrics are
    defectflow export [--model DIR] [--out model.onnx] one ONNX model: image tensor in, scores (+ map) out
    defectflow stage frames --params P --inp SRC --out DIR   one vision stage, no DVC/Prefect
    defectflow ingest | gate | nightly | clean-temp | models list|promote|rollback   operations (cli_ops.py)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from defectflow import layout
from defectflow.config import load_params
from defectflow.errors import DefectflowError


def _demo(args) -> int:
    from defectflow.sources import demo

    params = load_params(args.params)
    if args.out is None and params.source.kind != "demo":
        print(f"source.kind is '{params.source.kind}': no demo data needed")
        return 0
    out = Path(args.out or params.source.path)
    size = args.size or params.source.demo_size
    kind = "streams" if args.streams else params.source.demo_kind
    info_file = out / "demo.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("size") == size and info.get("seed") == params.seed and info.get("kind", "cameras") == kind:
            print(f"demo data ({kind}, {size}) already in {out}")
            return 0
    info = demo.generate(out, size=size, seed=params.seed, kind=kind)
    print(f"wrote demo data ({kind}, {size}) to {out}")
    return 0


def _check(args) -> int:
    load_params(args.params)
    print(f"{args.params}: ok")
    return 0


def _summary(args) -> int:
    metrics = layout.REPORTS / "metrics.json"
    if not metrics.is_file():
        print("no metrics yet: run `make run` (or `dvc repro`)")
        return 1
    m = json.loads(metrics.read_text())
    keys = ("image_auroc", "accuracy", "f1", "product_accuracy")
    shown = ", ".join(f"{k}={m[k]:.3f}" for k in keys if isinstance(m.get(k), (int, float)))
    print(f"metrics: {metrics}  ({shown})")
    print(f"report:  {layout.REPORTS / 'report.html'}" + (f" and {layout.REPORTS / 'report.pdf'}"
                                                            if (layout.REPORTS / "report.pdf").is_file() else ""))
    print(f"verdicts per product: {layout.REPORTS / 'verdicts.parquet'}")
    return 0


VISION_STAGES = ("frames", "detect", "masks", "roi", "augment", "synth")


def _stage(args) -> int:
    """One vision stage in this process (no DVC, no Prefect): for trying params on new footage."""
    import importlib

    report = importlib.import_module(f"defectflow.{args.name}").run(
        load_params(args.params), Path(args.inp), Path(args.out))
    print(report.summary())
    return 0


def _export(args) -> int:
    from defectflow.export import export_model

    from defectflow.registry.store import champion_or_default

    params = load_params(args.params)
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = champion_or_default(params, layout.STAGE_DIRS["train"], layout.THRESHOLD_FILE,
                                        logging.getLogger("defectflow.export"))[0]
    out = Path(args.out or layout.MODELS / "model.onnx")
    export_model(model_dir, out, params)
    import onnx
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    print(f"wrote {out}: input 'image' float32 {tuple(dims)} (N, S, S, 3) RGB in [0, 1] -> output 'score' (N,) "
          f"and each head's score (and 'anomaly_map' with a conv head)")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="defectflow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="write the synthetic demo videos")
    p.add_argument("--size", choices=["tiny", "small"])
    p.add_argument("--out")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--streams", action="store_true",
                   help="continuous product streams (source.demo_kind: streams; frames.lanes: examples/demo_streams)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("check", help="validate params.yaml")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(fn=_check)
    p = sub.add_parser("summary", help="where the report and metrics are")
    p.set_defaults(fn=_summary)
    p = sub.add_parser("stage", help="run one vision stage here, without DVC or Prefect")
    p.add_argument("name", choices=VISION_STAGES)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--inp", required=True, help="source folder (frames) or the previous stage's folder")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_stage)
    p = sub.add_parser("export", help="write one ONNX model (backbone + heads): image in, scores and anomaly map out")
    p.add_argument("--model", help="trained model folder (default: the registry's champion, else models/model)")
    p.add_argument("--out", help="output .onnx file (default: models/model.onnx)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_export)
    from defectflow.cli_ops import add_parsers
    add_parsers(sub)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except DefectflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
