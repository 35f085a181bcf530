"""Every knob of the pipeline, loaded from ``params.yaml`` into pydantic models.

Unknown keys and out-of-range values stop the load with an error that names the
key (e.g. ``train.hidden``) and the allowed range.
"""
from __future__ import annotations

from defectflow.params_base import ParamsError, Strict as _Strict  # noqa: F401 (re-exported)
from defectflow.params_model import (ConvHeadParams, EvaluateParams, MapsParams, TrainParams,  # noqa: F401
                                     ThresholdParams)
from defectflow.params_ops import (GateParams, IngestParams, NightlyParams, RegistryParams,  # noqa: F401
                                   ScaleParams)

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator




class SourceParams(_Strict):
    kind: Literal["demo", "videos", "images"] = "demo"
    path: str = "data/demo"
    demo_size: Literal["tiny", "small"] = "small"
    demo_kind: Literal["cameras", "streams"] = Field("cameras", description=(
        "demo videos: cameras (one product at a time, 4 cameras) or streams (continuous product streams: "
        "touching products, stop-and-go belt, two lanes in perspective; see sources/demo_streams.py)"))
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)


Region = Union[tuple[float, float, float, float], list[tuple[float, float]]]
DIRECTIONS = ("auto", "left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")
Direction = Literal["auto", "left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top"]


def _check_region(region):
    """A rectangle ``[x0, y0, x1, y1]`` or a polygon ``[[x, y], ...]`` (>= 3 points), fractions of the frame."""
    if region is None:
        return None
    if isinstance(region, tuple):
        x0, y0, x1, y1 = region
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("region must be x0 < x1 and y0 < y1, all within [0, 1]")
        return region
    if len(region) < 3:
        raise ValueError(f"a polygon region needs at least 3 [x, y] points, got {len(region)}")
    bad = [list(pt) for pt in region if not (0 <= pt[0] <= 1 and 0 <= pt[1] <= 1)]
    if bad:
        raise ValueError(f"polygon points must be fractions of the frame within [0, 1], got {bad[:3]}")
    area = 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(region, region[1:] + region[:1])))
    if area < 1e-4:
        raise ValueError("polygon region has (almost) no area")
    return region


class LaneParams(_Strict):
    """One belt in view: its region, direction of travel and counting line; product ids per lane."""
    name: str = Field(..., min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    region: Region = Field(..., description="[x0, y0, x1, y1] or a polygon [[x, y], ...], fractions of the frame")
    cameras: Optional[list[str]] = Field(None, description="cameras this lane is seen by; null = every camera")
    direction: Optional[Direction] = Field(None, description="direction of travel; null = frames.direction")
    line: Optional[tuple[float, float, float, float]] = Field(None, description=(
        "counting line x0, y0, x1, y1 (fractions of the frame); null = across the direction of travel "
        "through the lane's centre"))
    product_length: Optional[float] = Field(None, gt=0.0, le=1.0, description="null = frames.product_length")

    _region_ok = field_validator("region")(classmethod(lambda cls, v: _check_region(v)))

    @field_validator("line")
    @classmethod
    def _line_ok(cls, line):
        if line is not None:
            if not all(0 <= v <= 1 for v in line) or (line[0], line[1]) == (line[2], line[3]):
                raise ValueError("line must be two distinct points x0, y0, x1, y1 within [0, 1]")
        return line


class FramesParams(_Strict):
    window: int = Field(5, ge=1, le=31, description="frames kept per product pass, centred on the counting line")
    motion_threshold: int = Field(25, ge=1, le=254, description="grey-level change that counts as motion")
    min_area: float = Field(0.01, gt=0.0, lt=1.0, description="smallest moving blob, fraction of the region")
    min_pass_frames: int = Field(3, ge=1, le=1000)
    region: Optional[Region] = Field(
        None, description="[x0, y0, x1, y1] or a polygon [[x, y], ...] (fractions of the frame): the belt")
    on_bad_video: Literal["error", "warn"] = "error"
    min_travel: float = Field(0.25, ge=0.0, le=1.0, description=(
        "a track's centre must move across at least this share of its lane (along the direction of "
        "travel) to be counted (drops shake, hands reaching in and out, things left standing)"))
    shake_px: int = Field(0, ge=0, le=64, description=(
        "hand-held camera: a pixel only counts as moving if it differs from the background at every "
        "offset within this many frame pixels"))
    jpeg_passthrough: bool = Field(True, description=(
        "MJPG videos: motion on a reduced JPEG decode; kept frames written as the video's own JPEG (no re-encode)"))
    direction: Direction = Field("auto", description=(
        "direction of travel: auto (from the tracks' motion) or left_to_right / right_to_left / "
        "top_to_bottom / bottom_to_top"))
    product_length: Optional[float] = Field(None, gt=0.0, le=1.0, description=(
        "length of one product along the direction of travel, fraction of the lane's extent; touching "
        "products are split at multiples of it. null = estimated from the separate blobs"))
    stride: int = Field(3, ge=1, le=8, description=(
        "motion and tracking on every stride-th frame (the crossing frame is interpolated; every frame "
        "of the window is kept)"))
    tracker: Literal["belt", "norfair"] = Field("belt", description=(
        "association of boxes between tracked frames: belt (constant velocity + IoU assignment, ~40 us an "
        "update) or norfair (the library's Kalman tracker, ~10x slower: for high-resolution footage)"))
    max_lost_frames: int = Field(12, ge=1, le=1000, description=(
        "frames a track survives without a matching blob (occlusion, a blob missed) before it ends"))
    lanes: Optional[list[LaneParams]] = Field(None, description=(
        "several belts in view, each with its own region / direction / counting line; cameras that no "
        "lane lists use frames.region"))

    _region_ok = field_validator("region")(classmethod(lambda cls, v: _check_region(v)))

    @field_validator("lanes")
    @classmethod
    def _lanes_ok(cls, lanes):
        if lanes is not None:
            if not lanes:
                raise ValueError("lanes must list at least one lane (or be null)")
            names = [lane.name for lane in lanes]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"lane names must be unique, repeated: {dup}")
        return lanes


class DetectParams(_Strict):
    method: Literal["classical", "onnx"] = "classical"
    onnx_model: Optional[str] = Field(None, description="method onnx: path to a YOLO-style ONNX detector")
    onnx_layout: Literal["auto", "yolov5", "yolov8"] = Field(
        "auto", description="output layout: yolov5 (1, N, 5+C) or yolov8 (1, 4+C, N); auto: the longer axis is N")
    onnx_class: Optional[int] = Field(None, ge=0, description="keep only this class id; null: any class")
    score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    nms_iou: float = Field(0.45, gt=0.0, le=1.0, description="onnx: boxes overlapping more than this are merged")
    margin: float = Field(0.1, ge=0.0, le=1.0, description="extra border around the box, fraction of its side")
    crop_size: int = Field(256, ge=32, le=2048)
    diff_threshold: int = Field(30, ge=1, le=254)

    @model_validator(mode="after")
    def _onnx_ok(self):
        if self.method == "onnx" and not self.onnx_model:
            raise ValueError("method onnx needs onnx_model: the path to your ONNX detector")
        return self


class MasksParams(_Strict):
    method: Literal["mask", "crop", "none"] = Field(
        "mask", description="mask: composite foreground mask; crop: cut `shrink` off each side; none: crops as they are")
    shrink: float = Field(0.10, ge=0.0, lt=0.9,
                          description="mask: composite shrunk by this fraction and padded back; crop: cut off each side")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="share of a product's frames a pixel must be foreground in")
    diff_threshold: int = Field(12, ge=1, le=254, description=(
        "colour difference to the background plate that counts as half foreground (soft masks; "
        "lower than detect.diff_threshold: the composite and the shrink keep stray pixels out)"))
    refine: bool = Field(True, description="refine each soft mask edge-aware (guided filter steered by the crop)")

    @model_validator(mode="after")
    def _crop_ok(self):
        if self.method == "crop" and self.shrink >= 0.45:
            raise ValueError("with method crop, shrink is cut off each side: it must be < 0.45")
        return self


class RoiParams(_Strict):
    method: Literal["none", "mask", "circle"] = "none"
    clahe_clip: float = Field(2.0, gt=0.0, le=40.0)
    min_radius: float = Field(0.15, gt=0.0, lt=1.0, description="smallest circle radius, fraction of the image side")
    kmeans: bool = True


class AugmentParams(_Strict):
    enabled: bool = True
    copies: int = Field(2, ge=0, le=50, description="augmented copies per good training image")
    flip: bool = True
    rotate_deg: float = Field(45.0, ge=0.0, le=180.0)
    hue: float = Field(25.0, ge=0.0, le=90.0, description="hue shift in degrees, +-")
    saturation: float = Field(0.30, ge=0.0, le=1.0)
    brightness: float = Field(0.25, ge=0.0, le=1.0)
    exposure: float = Field(0.05, ge=0.0, le=1.0)


class SynthParams(_Strict):
    """StyleGAN2-ADA synthetic normals (``defectflow/synth/``): generator training budget, samples, use."""
    enabled: bool = True
    source: Literal["roi", "augment"] = "roi"
    size: Literal[16, 32, 64, 128, 256] = 64
    minutes: float | None = Field(0.3, gt=0.0, le=24 * 60)
    kimg: float | None = Field(None, gt=0.0, le=100000)
    batch: int = Field(16, ge=2, le=256)
    lr: float = Field(0.0025, gt=0.0, le=0.1)
    ema_kimg: float = Field(2.0, gt=0.0, le=100.0)
    ada_kimg: float = Field(20.0, gt=0.0, le=1000.0)
    channel_base: int = Field(1024, ge=64, le=32768)
    channel_max: int = Field(128, ge=8, le=512)
    n_images: int = Field(64, ge=0, le=100000)
    psi: float = Field(1.0, ge=0.0, le=1.0)
    use_in_training: bool = False
    threads: int = Field(1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    warm_start: bool = True
    quality_evals: int = Field(1, ge=1, le=100)

    @model_validator(mode="after")
    def _has_budget(self):
        if self.minutes is None and self.kimg is None:
            raise ValueError("synth: set minutes and/or kimg (the training budget)")
        return self


class Params(_Strict):
    seed: int = Field(0, ge=0)
    source: SourceParams = SourceParams()
    frames: FramesParams = FramesParams()
    detect: DetectParams = DetectParams()
    masks: MasksParams = MasksParams()
    roi: RoiParams = RoiParams()
    augment: AugmentParams = AugmentParams()
    synth: SynthParams = SynthParams()
    train: TrainParams = TrainParams()
    threshold: ThresholdParams = ThresholdParams()
    evaluate: EvaluateParams = EvaluateParams()
    maps: MapsParams = MapsParams()
    nightly: NightlyParams = NightlyParams()
    ingest: IngestParams = IngestParams()
    registry: RegistryParams = RegistryParams()
    gate: GateParams = GateParams()
    scale: ScaleParams = ScaleParams()

    @model_validator(mode="after")
    def _map_levels_ok(self):
        if self.maps.levels is not None and not set(self.maps.levels) <= set(self.train.conv.levels):
            raise ValueError(f"maps.levels {list(self.maps.levels)} must be a subset of train.conv.levels "
                             f"{list(self.train.conv.levels)}")
        return self


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_txt = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{got_txt}")
    return "\n".join(lines)


def params_from_dict(data: dict, origin: Path | str = "params") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(_describe(err, Path(origin))) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return params_from_dict(data, path)


def set_key(data: dict, dotted: str, value) -> None:
    """``set_key(d, "train.epochs", 5)`` sets ``d["train"]["epochs"] = 5``."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def parse_sets(items: list[str]) -> dict:
    """``["train.epochs=5", "roi.method=circle"]`` -> dotted-key overrides (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        out[key] = yaml.safe_load(value)
    return out


def load_params_with(path: Path | str, overrides: dict) -> Params:
    """``params.yaml`` (or the defaults if it is absent) with dotted-key overrides, validated."""
    path = Path(path)
    data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    for key, value in overrides.items():
        set_key(data, key, value)
    return params_from_dict(data, f"{path} + overrides")
