"""The attribution-method interface: `attribute(model, images, target) -> [B, gh, gw]` patch-grid maps."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from caap.models.vit import ViTClassifier


class AttributionMethod(ABC):
    """One attribution method. Subclasses live one per file in `caap.methods` and are built by Hydra.

    `requires_grad`: forward-only methods run under `torch.no_grad()`; gradient methods under
    `torch.enable_grad()`. Hooks and gradient rules must be installed by context managers that restore the
    model even when the method raises.
    """

    requires_grad: bool = False
    name: str = "method"

    def setup(self, model: ViTClassifier) -> None:  # noqa: B027  (optional hook)
        """Validate the configuration against the model (layer ranges, supported pooling), before any data."""

    @abstractmethod
    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        """Maps `[B, gh, gw]` for pixel-space images `[B, 3, H, W]` in [0, 1] and target classes `[B]` (long)."""

    def __call__(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        if images.ndim != 4 or target.shape != (images.shape[0],):
            raise ValueError(
                f"{self.name}: expected images [B,3,H,W] and target [B]; "
                f"got {tuple(images.shape)}, {tuple(target.shape)}"
            )
        grad_mode = torch.enable_grad() if self.requires_grad else torch.no_grad()
        with grad_mode:
            maps = self.attribute(model, images, target.long())
        gh, gw = model.grid_size(images)
        if maps.shape != (images.shape[0], gh, gw):
            raise RuntimeError(
                f"{self.name} returned maps {tuple(maps.shape)}, expected {(images.shape[0], gh, gw)}"
            )
        return maps.detach()
