"""A centred Gaussian prior: `exp(-d^2 / (2 sigma^2))` of each patch's distance d (in patches) to the grid
centre. It ignores the image and the model; like `random`, it is a floor every method must beat (a centre
bias wins pointing games on object-centred data, which is what it measures)."""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.models.vit import ViTClassifier


def gaussian_map(gh: int, gw: int, sigma: float, device: torch.device | str | None = None) -> Tensor:
    """`[gh, gw]` centred Gaussian with standard deviation `sigma` patches (peak 1 at the centre)."""
    ys = torch.arange(gh, device=device, dtype=torch.float32) - (gh - 1) / 2
    xs = torch.arange(gw, device=device, dtype=torch.float32) - (gw - 1) / 2
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-d2 / (2 * sigma**2))


class GaussianPrior(AttributionMethod):
    """The same centred Gaussian map `[B, gh, gw]` for every image."""

    requires_grad = False
    name = "gaussian_prior"

    def __init__(self, sigma: float = 2.0) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(
                f"method.sigma={sigma!r} must be a positive number (standard deviation in patches)"
            )
        self.sigma = float(sigma)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        gh, gw = model.grid_size(images)
        return gaussian_map(gh, gw, self.sigma, images.device).expand(images.shape[0], gh, gw).clone()
