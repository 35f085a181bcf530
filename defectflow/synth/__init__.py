"""Synthetic normals: a compact StyleGAN2-ADA in pure PyTorch (``networks``, ``ada``, ``trainer``,
``fit``, ``quality``, ``samples``) and the DVC stage (``stage.run``, re-exported as ``synth.run``)."""
from defectflow.synth.stage import run

__all__ = ["run"]
