"""Every knob of the pipeline, loaded from ``params.yaml`` into pydantic models.

Unknown keys and out-of-range values stop the load with an error that names the
key (e.g. ``train.hidden``) and the allowed range.
"""
from __future__ import annotations

from defectflow.errors import DefectflowError

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(DefectflowError):
    """params.yaml is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceParams(_Strict):
    kind: Literal["demo", "videos", "images"] = "demo"
    path: str = "data/demo"
    demo_size: Literal["tiny", "small"] = "small"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class FramesParams(_Strict):
    window: int = Field(5, ge=1, le=31, description="frames kept per product pass, centred on the view centre")
    motion_threshold: int = Field(25, ge=1, le=254)
    min_area: float = Field(0.01, gt=0.0, lt=1.0, description="smallest moving blob, fraction of the region")
    min_pass_frames: int = Field(3, ge=1, le=1000)
    region: Optional[tuple[float, float, float, float]] = Field(
        None, description="x0, y0, x1, y1 as fractions of the frame: where products pass (the belt)")
    on_bad_video: Literal["error", "warn"] = "error"

    @model_validator(mode="after")
    def _region_ok(self):
        if self.region is not None:
            x0, y0, x1, y1 = self.region
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError("region must be x0 < x1 and y0 < y1, all within [0, 1]")
        return self


class DetectParams(_Strict):
    method: Literal["classical", "onnx"] = "classical"
    onnx_model: Optional[str] = None
    score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    margin: float = Field(0.1, ge=0.0, le=1.0, description="extra border around the box, fraction of its side")
    crop_size: int = Field(256, ge=32, le=2048)
    diff_threshold: int = Field(30, ge=1, le=254)


class MasksParams(_Strict):
    enabled: bool = True
    shrink: float = Field(0.10, ge=0.0, lt=0.9, description="composite mask is shrunk by this fraction and padded back")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)


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
    enabled: bool = False
    n_images: int = Field(0, ge=0, le=100000)


class TrainParams(_Strict):
    backbone: Literal["efficientnet_lite0", "squeezenet1_1", "alexnet"] = "efficientnet_lite0"
    weights: Optional[str] = Field(None, description="path to backbone weights; default: the packaged ones")
    pretrained: bool = True
    image_size: int = Field(224, ge=32, le=1024)
    scales: tuple[float, ...] = Field((1.0, 0.5), min_length=1, max_length=4)
    n_coupling_blocks: int = Field(8, ge=1, le=32)
    hidden: int = Field(256, ge=8, le=8192)
    clamp: float = Field(2.0, gt=0.0, le=10.0)
    epochs: int = Field(20, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-5, ge=0.0, le=1.0)
    n_transforms: int = Field(4, ge=1, le=64, description="train-time rotations per image (DifferNet)")
    n_transforms_test: int = Field(4, ge=1, le=64)
    threads: int = Field(2, ge=1, le=256)

    @model_validator(mode="after")
    def _scales_ok(self):
        if any(not (0.0 < s <= 1.0) for s in self.scales):
            raise ValueError("scales must each be in (0, 1]")
        return self


class ThresholdParams(_Strict):
    method: Literal["target_tpr", "f1"] = "target_tpr"
    target_tpr: float = Field(0.85, gt=0.0, le=1.0)
    fallback_fpr: float = Field(0.05, gt=0.0, lt=1.0, description="used when validation has no defective images")


class EvaluateParams(_Strict):
    video: bool = True
    max_report_images: int = Field(24, ge=0, le=1000)


class NightlyParams(_Strict):
    cron: str = Field("0 2 * * *", description="when the nightly retrain runs (cron, server time zone)")
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError("cron must have 5 fields (minute hour day month weekday)")
        return cron


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
    nightly: NightlyParams = NightlyParams()


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
