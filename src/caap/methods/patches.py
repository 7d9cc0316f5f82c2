"""Between pixel maps and the patch grid: pooling pixel attributions to patches, and the patch index of every
pixel (a Captum `feature_mask`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from caap.models.vit import ViTClassifier


def pool_to_patches(pixel_map: Tensor, model: ViTClassifier, images: Tensor) -> Tensor:
    """Pixel maps `[B, H, W]` or `[B, C, H, W]` -> patch maps `[B, gh, gw]`: mean over each patch's pixels."""
    if pixel_map.ndim == 3:
        pixel_map = pixel_map[:, None]
    gh, gw = model.grid_size(images)
    ph, pw = model.patch_size
    x = pixel_map[..., : gh * ph, : gw * pw].float().mean(1, keepdim=True)
    return F.avg_pool2d(x, kernel_size=(ph, pw))[:, 0]


def patch_feature_mask(model: ViTClassifier, images: Tensor) -> Tensor:
    """`[1, 1, H, W]` long: the row-major patch index of every pixel (a Captum `feature_mask`).

    Pixels beyond the last full patch (images not divisible by the patch size) join the last patch row/column.
    """
    gh, gw = model.grid_size(images)
    ph, pw = model.patch_size
    h, w = images.shape[-2:]
    rows = (torch.arange(h, device=images.device) // ph).clamp_max(gh - 1)
    cols = (torch.arange(w, device=images.device) // pw).clamp_max(gw - 1)
    return (rows[:, None] * gw + cols[None, :])[None, None]
