"""Overlay pictures of maps for W&B and reports: image | map | map over image with the ground-truth cell."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import Tensor


def _outline(mask: Tensor) -> Tensor:
    """Boundary pixels `[H, W]` bool of a bool mask `[H, W]`."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def overlay_panel(
    image: Tensor, attribution: Tensor, cell_mask: Tensor | None = None, scale: int = 4
) -> np.ndarray:
    """An RGB uint8 picture `[H*scale, 3*W*scale, 3]`: the image, the map (signed, 'bwr' colormap, symmetric
    around 0), and the map blended over the image; the target's cell outlined in green when given.

    image `[3, H, W]` in [0, 1]; attribution `[gh, gw]`; cell_mask `[H, W]` bool or None.
    """
    image = image.detach().float().cpu().clamp(0, 1)
    h, w = image.shape[-2:]
    amap = attribution.detach().float().cpu()
    bound = float(amap.abs().max()) or 1.0
    up = F.interpolate(amap[None, None], size=(h, w), mode="nearest")[0, 0]
    coloured = torch.from_numpy(colormaps["bwr"]((up / bound * 0.5 + 0.5).numpy())[..., :3]).float()
    img = image.permute(1, 2, 0)
    blend = 0.5 * img + 0.5 * coloured
    if cell_mask is not None:
        edge = _outline(cell_mask.cpu())
        for panel in (img, coloured, blend):
            panel[edge] = torch.tensor([0.0, 0.8, 0.0])
    picture = torch.cat([img, coloured, blend], dim=1)
    picture = picture.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (picture.numpy() * 255).round().astype(np.uint8)
