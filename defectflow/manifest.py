"""Parquet manifests passed between stages: a row per item, a declared schema per stage.

Every manifest is checked against its schema on write and on read (columns,
types, required values), and written atomically (temp file + rename).

>>> df = new_items([...])                       # doctest: +SKIP
>>> write_manifest(df, FRAMES, "data/frames/manifest.parquet")   # doctest: +SKIP
"""
from __future__ import annotations

from defectflow.errors import DefectflowError

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from defectflow.fsutil import atomic_path

SPLITS = ("train", "val", "test")
LABELS = ("good", "defect", "unknown")


class ManifestError(DefectflowError):
    """A manifest file is missing, unreadable or does not match its schema."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    required: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Schema:
    name: str
    columns: tuple[Column, ...]

    def extend(self, name: str, *columns: Column) -> "Schema":
        return Schema(name, self.columns + tuple(columns))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def arrow(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=not c.required) for c in self.columns])


def _c(name, type_, required=False, doc=""):
    return Column(name, type_, required, doc)


S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()

ITEMS = Schema("items", (
    _c("item_id", S, True, "unique id of this row"),
    _c("product_id", S, True, "the physical product; shared by all its cameras"),
    _c("run", S, True, "recording session (one video per camera) or image folder"),
    _c("camera", S, True, "camera name"),
    _c("split", S, True, "train / val / test"),
    _c("label", S, True, "good / defect / unknown"),
    _c("defect_type", S, False, "e.g. scratch; null for good"),
    _c("image_path", S, True, "the image this stage hands on"),
    _c("gt_mask_path", S, False, "ground-truth defect mask, where known"),
    _c("source", S, True, "demo / videos / images"),
))

FRAMES = ITEMS.extend(
    "frames",
    _c("video_path", S, False, "source video (null for image sources)"),
    _c("frame_index", I, False, "frame number in the video"),
    _c("pass_index", I, False, "product pass number in this video"),
    _c("is_center", B, True, "frame where the product is nearest the view centre"),
    _c("t_sec", F, False, "time of the frame in the video"),
    _c("lane", S, False, "belt the product travels on (frames.lanes; 'main' for frames.region)"),
    _c("track_id", I, False, "the product's track in this video and lane"),
    _c("track_x0", I, False, "the track's box at this frame (frame px, x1/y1 exclusive)"),
    _c("track_y0", I, False), _c("track_x1", I, False), _c("track_y1", I, False),
    _c("tracks_path", S, False, "every track's box at every tracked frame of this video (Parquet)"),
)

DETECT = FRAMES.extend(
    "detect",
    _c("box_x0", I, False), _c("box_y0", I, False), _c("box_x1", I, False), _c("box_y1", I, False),
    _c("detect_score", F, False, "detector confidence (1.0 for the classical detector)"),
    _c("background_path", S, False, "background plate of this camera, used by masks"),
)

MASKS = DETECT.extend(
    "masks",
    _c("fg_mask_path", S, False, "per-frame soft foreground mask"),
    _c("composite_mask_path", S, False, "composite mask of this product/camera after shrink + pad"),
)

ROI = MASKS.extend(
    "roi",
    _c("roi_found", B, False, "circle ROI found (null when roi.method is not circle)"),
    _c("roi_mask_path", S, False),
)

AUGMENT = ROI.extend(
    "augment",
    _c("augment_of", S, False, "item_id of the original, for augmented copies"),
)

SYNTH = AUGMENT.extend(
    "synth",
    _c("synthetic", B, True, "made by the generator"),
    _c("synth_seed", I, False, "synthetic rows: the seed of its z and noise (defectflow.synth.samples)"),
    _c("synth_psi", F, False, "synthetic rows: the truncation psi it was sampled at"),
)

SCORES = SYNTH.extend(
    "scores",
    _c("score", F, True, "anomaly score (higher = more anomalous): the train.score_from head's"),
    _c("pred_defect", B, False, "score >= threshold"),
    _c("score_image", F, False, "image head score (null when that head is not trained)"),
    _c("score_conv", F, False, "conv head score from its anomaly map (maps.score; null when not trained)"),
    _c("map_mean", F, False, "conv head: mean of the anomaly map"),
    _c("map_area", F, False, "conv head: share of map pixels >= the map threshold (null before one is fitted)"),
    _c("n_boxes", I, False, "conv head: defect boxes at the map threshold (null before one is fitted)"),
)

VERDICTS = Schema("verdicts", (
    _c("product_id", S, True),
    _c("run", S, True),
    _c("split", S, True),
    _c("label", S, True),
    _c("n_cameras", I, True),
    _c("max_score", F, True),
    _c("flagged_cameras", S, True, "comma-separated cameras over the threshold"),
    _c("verdict", S, True, "good / defect"),
))

SCHEMAS = {s.name: s for s in (ITEMS, FRAMES, DETECT, MASKS, ROI, AUGMENT, SYNTH, SCORES, VERDICTS)}


def conform(df: pd.DataFrame, schema: Schema, origin: str = "manifest") -> pa.Table:
    """Check ``df`` against ``schema`` and return it as an Arrow table in schema order.

    Missing optional columns are added as nulls; unknown columns, missing required
    columns, wrong types and nulls in required columns raise ManifestError.
    """
    extra = [c for c in df.columns if c not in schema.names]
    if extra:
        raise ManifestError(f"{origin}: columns not in the '{schema.name}' schema: {extra}")
    df = df.copy()
    for col in schema.columns:
        if col.name not in df.columns:
            if col.required:
                raise ManifestError(f"{origin}: required column '{col.name}' is missing ('{schema.name}' schema)")
            df[col.name] = None
    df = df[schema.names]
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ManifestError(f"{origin}: cannot convert to the '{schema.name}' schema: {err}") from None
    arrays = []
    for col, arr in zip(schema.columns, table.columns):
        if pa.types.is_null(arr.type):
            arr = pa.nulls(len(arr), col.type)
        elif arr.type != col.type:
            try:
                arr = arr.cast(col.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise ManifestError(
                    f"{origin}: column '{col.name}' has type {arr.type}, expected {col.type}") from None
        if col.required and arr.null_count:
            raise ManifestError(f"{origin}: column '{col.name}' is required but has {arr.null_count} empty value(s)")
        arrays.append(arr)
    table = pa.Table.from_arrays(arrays, schema=schema.arrow())
    _check_values(table, origin)
    return table


def _check_values(table: pa.Table, origin: str) -> None:
    names = table.column_names
    for col, allowed in (("split", SPLITS), ("label", LABELS)):
        if col in names:
            bad = set(table.column(col).to_pylist()) - set(allowed)
            if bad:
                raise ManifestError(f"{origin}: column '{col}' has values {sorted(bad)}, allowed {list(allowed)}")
    if "item_id" in names:
        ids = table.column("item_id").to_pylist()
        if len(ids) != len(set(ids)):
            raise ManifestError(f"{origin}: column 'item_id' has duplicate values")


def write_manifest(df: pd.DataFrame, schema: Schema, path: Path | str, meta: dict | None = None) -> Path:
    """Validate and write ``df`` atomically; ``meta`` (str -> str) goes into the file metadata."""
    path = Path(path)
    table = conform(df, schema, origin=str(path))
    md = {b"defectflow.schema": schema.name.encode()}
    for k, v in (meta or {}).items():
        md[f"defectflow.{k}".encode()] = str(v).encode()
    table = table.replace_schema_metadata(md)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(path: Path | str, schema: Schema) -> pd.DataFrame:
    """Read a manifest and check it against ``schema``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (has the previous stage run?)")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise ManifestError(f"{path}: not a readable Parquet file: {err}") from None
    table = conform(table.to_pandas(), schema, origin=str(path))
    return table.to_pandas()


def read_meta(path: Path | str) -> dict[str, str]:
    md = pq.read_schema(path).metadata or {}
    return {k.decode().removeprefix("defectflow."): v.decode() for k, v in md.items()
            if k.startswith(b"defectflow.")}
