"""Gradient maps of the image head (DifferNet, seed 001 section 3.4): where in the image the score
comes from, for a head that only sees pooled features.

For each image the image head's score (mean NLL per dim over the ``n_transforms_test`` rotations)
is back-propagated through the density model and the torch backbone to the input pixels; the
map is the absolute gradient summed over the colour channels, Gaussian-blurred (``maps.sigma``)::

    maps = gradient_maps(load_model(model_dir), images, params)   # (N, S, S) float32, >= 0

A map is a first-order explanation: moving the pixels where it is high changes the score most.
Torch is needed (ONNX Runtime has no gradients), so this runs on the few images a report shows.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from defectflow.anomaly_maps import gaussian_ksize
from defectflow.config import Params
from defectflow.errors import DefectflowError
from defectflow.export import ExportError, FullScorer
from defectflow.features import _resize


class GradientMapError(DefectflowError):
    """Gradient maps cannot be made with these settings."""


class GradientMapper:
    """The image head of a loaded model (:class:`defectflow.scoring.LoadedModel`) in torch, as
    :class:`defectflow.export.FullScorer` computes it, ready to differentiate its score with respect
    to input pixels."""

    def __init__(self, model, params: Params):
        try:
            self.scorer = FullScorer(model, params.train.n_transforms_test).eval()
        except ExportError as err:
            raise GradientMapError(f"gradient maps: {err}") from None
        self.size = self.scorer.size
        self.sigma = float(params.maps.sigma)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Image-head scores ``(N,)`` of ``x (N, S, S, 3)`` RGB in [0, 1] (the pipeline's, in torch)."""
        return self.scorer(x)[0]

    def maps(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """``(N, S, S)`` gradient maps of float RGB images (any size: resized to the model's)."""
        out = np.zeros((len(images), self.size, self.size), np.float32)
        self.scorer.requires_grad_(False)
        for i in range(0, len(images), batch_size):
            batch = np.stack([_resize(np.asarray(img, np.float32), self.size) for img in images[i:i + batch_size]])
            x = torch.from_numpy(batch).requires_grad_(True)
            self.score(x).sum().backward()
            g = x.grad.abs().sum(dim=3).numpy()
            for k, m in enumerate(g):
                if self.sigma > 0:
                    ks = gaussian_ksize(self.sigma)
                    m = cv2.GaussianBlur(m, (ks, ks), self.sigma, borderType=cv2.BORDER_REFLECT_101)
                out[i + k] = m
        return out


def gradient_maps(model, images: Sequence[np.ndarray], params: Params) -> np.ndarray:
    """``(N, S, S)`` gradient maps of the image head's score for float RGB ``images`` (see module doc)."""
    return GradientMapper(model, params).maps(images)
