"""Random attribution: i.i.d. uniform maps from a seeded generator, the floor every method must beat."""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.models.vit import ViTClassifier


class RandomAttribution(AttributionMethod):
    """Uniform [0, 1) maps `[B, gh, gw]`, reproducible for a given seed and call sequence."""

    requires_grad = False
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        gh, gw = model.grid_size(images)
        return torch.rand(images.shape[0], gh, gw, generator=self.generator).to(images.device)
