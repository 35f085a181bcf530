"""ONNX Runtime speed and feature sizes of the registry's backbones; one JSON line per backbone.

    python bench/backbones.py [--backbones efficientnet_lite0,efficientnet_lite1] [--sizes 224,320]

Only backbones whose pretrained weights are here offline are timed (packaged, ``--weights`` or
the torch hub cache); the others are named on stderr. Per input size: ``images_per_s`` of the
exported backbone graph (normalisation, maps and pooling inside; the ``pooled`` output fetched)
on one preloaded batch of random images (``--batch``, ``--threads`` intra-op threads), best of 3
after a warm-up run, and the map shapes ``(C, h, w)``. ``feature_dim`` is the pooled size per scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.auroc import _rate  # noqa: E402
from defectflow.backbones import BackboneError, get_backbone, resolve_weights  # noqa: E402
from defectflow.features import OnnxBackbone  # noqa: E402

DEFAULT = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default=DEFAULT, help="comma-separated registry names")
    ap.add_argument("--sizes", default="224,320,448", help="comma-separated square input sizes, px")
    ap.add_argument("--weights", default=None, help="weights file (only with a single --backbones name)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="ONNX export cache (default: $DEFECTFLOW_CACHE or .cache/defectflow)")
    args = ap.parse_args()
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.weights and len(names) != 1:
        ap.error("--weights needs exactly one --backbones name")
    rng = np.random.default_rng(0)
    for name in names:
        spec = get_backbone(name)
        try:
            weights = resolve_weights(name, args.weights)
        except BackboneError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        rates, maps, weights_id = {}, {}, None
        for size in sizes:
            net = OnnxBackbone(name, size, weights=weights, threads=args.threads, cache=args.cache)
            weights_id = net.weights_id
            x = rng.random((args.batch, size, size, 3), dtype=np.float32)
            maps[size] = [list(m.shape[1:]) for m in net.run(x[:1])]
            net.pooled(x)                                            # warm-up
            rates[size] = round(_rate(args.batch, lambda: net.pooled(x), 3), 1)
        print(json.dumps({"backbone": name, "weights_id": weights_id, "native_size": spec.input_size,
                          "feature_dim": spec.feature_dim,
                          "layers": [[l.name, l.channels, l.stride] for l in spec.layers],
                          "batch": args.batch, "threads": args.threads,
                          "images_per_s": rates, "maps": maps}), flush=True)


if __name__ == "__main__":
    main()
