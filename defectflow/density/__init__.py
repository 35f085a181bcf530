"""The normalizing-flow density model (DifferNet family), our own compact implementation.

- ``blocks.py``: the invertible blocks and their one contract (sign convention written there).
- ``model.py``: :class:`DensityModel` (standardise -> coupling/permutation blocks -> N(0, I)),
  ``nll`` with every term, ``score`` = mean NLL per dim over transforms.
- ``fit.py``: :func:`fit_density`, seeded maximum-likelihood training with validation-NLL selection.

Named "density", never "flow": Prefect owns that word in this project.
"""
from defectflow.density.blocks import AffineCoupling, FixedPermutation, InvertibleBlock, Standardize, soft_clamp
from defectflow.density.fit import DensityFitError, FitConfig, FitResult, feature_stats, fit_density
from defectflow.density.model import DensityConfig, DensityModel

__all__ = ["AffineCoupling", "FixedPermutation", "InvertibleBlock", "Standardize", "soft_clamp",
           "DensityConfig", "DensityModel", "DensityFitError", "FitConfig", "FitResult",
           "feature_stats", "fit_density"]
