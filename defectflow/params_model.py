"""Params sections of the model (``params.yaml``: train with its conv head, threshold, evaluate, maps);
assembled into :class:`defectflow.config.Params`."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from defectflow.params_base import Strict as _Strict


class ConvHeadParams(_Strict):
    """The fully convolutional density head (``train.head: conv | both``): maps, pixel AUROC, boxes."""
    levels: tuple[int, ...] = Field((0, 1), min_length=1, max_length=3, description=(
        "backbone feature levels it models (0 = stride 8, 1 = stride 16, 2 = stride 32)"))
    merge: tuple[int, ...] = Field((0, 1), max_length=3, description=(
        "levels concatenated into one patch feature on the finest one's grid (PatchCore's patches: each "
        "position sees its detail and its context), modelled together (those among `levels`, when two or "
        "more are); [] = every level alone"))
    merge_mode: Literal["context", "concat"] = Field("context", description=(
        "merged levels modelled as p(finest | context of the coarser) p(coarser) (context) or as one "
        "concatenated feature (concat: the same joint, 2.5x the cost)"))
    context_channels: int = Field(64, ge=1, le=1024, description="merge_mode context: learnt context channels")
    local_average: int = Field(3, ge=1, le=7, description=(
        "each level averaged over every position's k x k neighbourhood first (odd; 1 = off)"))
    temper: float = Field(0.1, ge=0.0, le=1.0, description=(
        "beta: positions weighted by p^-beta in training, so rare normal patches are learnt as well as common "
        "ones (0 = plain maximum likelihood)"))
    n_blocks: int = Field(4, ge=1, le=32)
    hidden_ratio: float = Field(0.5, gt=0.0, le=8.0, description="subnet hidden channels / level channels")
    kernels: tuple[int, ...] = Field((1,), min_length=1, max_length=8, description="subnet kernels, alternating")
    subnet: Literal["dense", "separable"] = Field("dense", description=(
        "dense: k x k convs; separable: 1 x 1 -> depthwise k x k -> 1 x 1 (k x k context, about 1 x 1 cost)"))
    clamp: float = Field(2.0, gt=0.0, le=10.0)
    epochs: int = Field(16, ge=1, le=10000, description="per level, the epoch with the lowest good-val NLL is kept")
    batch_size: int = Field(16, ge=1, le=4096, description="images per step (each gives h * w positions)")
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-5, ge=0.0, le=1.0)
    memory: int = Field(8192, ge=0, le=262144, description=(
        "patches in the memory of normal patches (greedy coreset of the training patches) that verifies the "
        "map's highest cells (maps.verify_share); 0 = off: the conv image score is the map's maximum"))

    @model_validator(mode="after")
    def _conv_ok(self):
        if any(not 0 <= lv <= 2 for lv in self.levels) or len(set(self.levels)) != len(self.levels):
            raise ValueError("levels must be distinct, each 0, 1 or 2")
        if any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError("kernels must be odd and >= 1")
        if len(set(self.merge)) != len(self.merge) or any(not 0 <= lv <= 2 for lv in self.merge):
            raise ValueError("merge must list distinct levels, each 0, 1 or 2")
        if self.local_average % 2 == 0:
            raise ValueError("local_average must be odd")
        return self

    def groups(self) -> list[tuple[int, ...]]:
        """Input positions (in ``levels``) of each modelled group: the levels of ``merge`` that are among
        ``levels`` (when two or more are), then every other level alone."""
        pos = {lv: i for i, lv in enumerate(self.levels)}
        merged = [lv for lv in self.levels if lv in self.merge]
        if len(merged) < 2:
            merged = []
        out = [tuple(pos[lv] for lv in merged)] if merged else []
        return out + [(pos[lv],) for lv in self.levels if lv not in merged]


class TrainParams(_Strict):
    head: Literal["image", "conv", "both"] = Field("both", description=(
        "image: DifferNet-style pooled-feature head; conv: fully convolutional head (maps, boxes); both"))
    score_from: Literal["image", "conv", "fused"] = Field("fused", description=(
        "head both: the image score that is thresholded: one head's, or fused = weighted mean of both heads' "
        "scores, each standardised on good validation images (a single head scores alone)"))
    image_weight: float = Field(0.2, ge=0.0, le=1.0, description=(
        "score_from fused: the image head's weight (the conv head's is 1 - it), recorded in fusion.json"))
    conv: ConvHeadParams = ConvHeadParams()
    backbone: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "squeezenet1_1", "alexnet",
                      "wide_resnet50_2", "resnet18"] = "efficientnet_lite0"
    weights: Optional[str] = Field(None, description="path to backbone weights; default: the packaged ones")
    pretrained: bool = True
    input_norm: Literal["percentile", "none"] = Field("percentile", description=(
        "per-image brightness / contrast normalisation before the backbone: the 1st-99th luminance percentiles "
        "mapped to 0.1-0.9 (illumination drift between sessions, parts of varying darkness); none: as captured"))
    image_size: Union[int, Literal["auto"]] = Field("auto", description=(
        "square backbone input, px (32-1024); auto: follows the data, the median short side of the training "
        "images rounded down to a multiple of 32, within 224-448 (small defects of large images stay visible)"))
    scales: tuple[float, ...] = Field((1.0,), min_length=1, max_length=4, description=(
        "image scales whose pooled features feed the density model; each gives the backbone's "
        "3 pyramid levels (strides 8/16/32)"))
    features_per_scale: Optional[int] = Field(None, ge=2, le=4096, description=(
        "PCA components kept per scale (smaller head); null = all (measured: PCA 256 loses AUROC on magnetic tile)"))
    n_coupling_blocks: int = Field(8, ge=1, le=32)
    hidden: int = Field(192, ge=8, le=8192)
    clamp: float = Field(2.0, gt=0.0, le=10.0)
    epochs: int = Field(30, ge=1, le=10000, description="most epochs; training stops `patience` epochs after the best")
    patience: int = Field(5, ge=1, le=10000, description="epochs without a better selection-part val NLL before stopping")
    batch_size: int = Field(256, ge=1, le=4096)
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-5, ge=0.0, le=1.0)
    n_transforms: int = Field(4, ge=1, le=64, description="train-time rotations per image (DifferNet)")
    n_transforms_test: int = Field(1, ge=1, le=64, description=(
        "test-time rotations averaged by the image head (each one more backbone pass per image)"))
    threads: int = Field(2, ge=1, le=256)
    fit_threads: int = Field(1, ge=1, le=256, description=(
        "torch threads for the density fit (measured on the shared 2-core box: 1 thread 5x faster than 2 under load)"))
    selection: Literal["val_split", "last_epoch"] = Field("val_split", description=(
        "val_split: a seeded share of good val images picks the epoch, another standardises the heads' scores "
        "(fused), the rest calibrates the threshold; last_epoch: train all epochs, no val image picks one"))
    select_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of good val images used to pick the epoch")
    standardise_fraction: float = Field(0.2, gt=0.0, lt=1.0, description=(
        "both heads: share of good val images whose scores standardise each head (fusion.json); "
        "never the ones that pick the epoch or calibrate the threshold"))
    feature_cache: bool = Field(True, description="cache backbone features per image under .cache/defectflow/features")
    on_bad_image: Literal["error", "skip"] = Field("error", description=(
        "unreadable / truncated image: stop with its path, or skip it and list it in the card / log"))

    @field_validator("image_size")
    @classmethod
    def _size_ok(cls, v):
        if v != "auto" and not 32 <= int(v) <= 1024:
            raise ValueError("image_size must be auto or 32-1024 px")
        return v

    @model_validator(mode="after")
    def _scales_ok(self):
        if any(not (0.0 < s <= 1.0) for s in self.scales):
            raise ValueError("scales must each be in (0, 1]")
        if self.select_fraction + self.standardise_fraction >= 0.95:
            raise ValueError("select_fraction + standardise_fraction must leave at least 5% of the good val images "
                             "to calibrate the threshold")
        return self

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads trained: ``("image",)``, ``("conv",)`` or ``("image", "conv")``."""
        return ("image", "conv") if self.head == "both" else (self.head,)

    @property
    def scored_by(self) -> str:
        """The head whose score is ``score``: ``score_from`` with both heads, else the only one."""
        return self.score_from if self.head == "both" else self.head


class ThresholdParams(_Strict):
    method: Literal["target_fpr", "target_tpr", "f1"] = Field("target_fpr", description=(
        "target_fpr: the false-alarm rate the line can afford, from good calibration images (conformal); "
        "target_tpr / f1: need defective validation images (else target_fpr is used, and said)"))
    target_fpr: float = Field(0.05, gt=0.0, lt=1.0, description=(
        "share of good products the line can afford to flag; needs at least 1/target_fpr - 1 good calibration images"))
    target_tpr: float = Field(0.85, gt=0.0, le=1.0)
    review_quantile: float = Field(0.90, gt=0.0, lt=1.0, description=(
        "operator bands: below low = min(threshold, this quantile of good val scores) 'good'; "
        "at or above high = max(threshold, highest good val score) 'bad'; between them 'review'"))


class EvaluateParams(_Strict):
    video: bool = True
    max_report_images: int = Field(24, ge=0, le=1000)
    bootstrap: int = Field(1000, ge=0, le=100000, description="bootstrap resamples for the image AUROC 95% CI (0 = off)")
    gradient_maps: bool = Field(False, description=(
        "image head gradient maps (DifferNet): |d score / d pixel| of the flagged products the report shows, "
        "beside the conv head's heat map (or alone without one); torch, about 0.1 s per image"))
    line: str = Field("line-1", pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=40, description=(
        "production line name: the report title and the Prefect artifact keys (evaluate-<line>-summary, ...)"))
    history: str = Field("data/history/runs.jsonl", min_length=1, description=(
        "run history (one JSON line per evaluate / score run) that draws the report's defect-rate trend; "
        "a relative path is taken from the folder that holds the reports folder (the project root)"))
    pdf: bool = Field(True, description="also write report.pdf (WeasyPrint)")


class MapsParams(_Strict):
    """Anomaly maps of the conv head: image size maps, their image score, boxes."""
    levels: Optional[tuple[int, ...]] = Field(None, min_length=1, max_length=3, description=(
        "conv levels whose groups make the shown anomaly map (heat maps, boxes, pixel AUROC) and the conv "
        "head's image score; null = every level of train.conv.levels"))
    sigma: float = Field(4.0, ge=0.0, le=64.0, description="Gaussian blur of the shown maps, pixels at train.image_size")
    score: Literal["max", "topk", "mean"] = Field("max", description=(
        "conv head image score from the map's cells (one per finest backbone cell, unblurred)"))
    border: int = Field(1, ge=0, le=8, description=(
        "cells at each edge left out of the conv image score (zero-padding artefacts of the backbone); 0 = none"))
    top_fraction: float = Field(0.01, gt=0.0, le=1.0, description="score topk: share of the highest pixels averaged")
    verify_share: float = Field(0.01, gt=0.0, le=1.0, description=(
        "with a patch memory (train.conv.memory): the conv image score is the largest distance to the memory "
        "over this share of the map's inner cells, the highest (at least 4: 29 cells at 448 px, 7 at 224): the "
        "cost follows the grid, as the backbone's does"))
    min_area: float = Field(0.001, gt=0.0, description="smallest box region: fraction of the map (< 1) or pixels (>= 1)")
    confidence: Literal["max", "mean"] = Field("max", description="box confidence: max or mean of the map inside")
