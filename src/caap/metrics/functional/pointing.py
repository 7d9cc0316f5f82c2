"""Localisation scores of patch-grid maps against pixel masks: grid pointing game and pointing game.

Maps live on the patch grid `[P, gh, gw]`; masks on pixels `[P, H, W]`. A map is read in pixels as its
nearest-neighbour upsampling (each patch covers its block of pixels; for H, W not multiples of gh, gw, pixel
row y belongs to patch row `floor(y * gh / H)`, as `F.interpolate(mode='nearest')` assigns it). Scores are
computed exactly on the grid with per-patch pixel counts (`mask_patch_counts`), which equals computing them
on the upsampled map, without materialising it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _assignment(size: int, cells: int, device: torch.device) -> Tensor:
    """`[cells, size]` one-hot: pixel coordinate -> patch coordinate under nearest upsampling."""
    owner = torch.div(torch.arange(size, device=device) * cells, size, rounding_mode="floor")
    return (owner[None, :] == torch.arange(cells, device=device)[:, None]).to(torch.float64)


def mask_patch_counts(masks: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per patch, the number of mask pixels `[P, gh, gw]` and the number of pixels `[gh, gw]` it covers.

    Args:
        masks: `[P, H, W]` bool (or 0/1) pixel masks.
        grid: the patch grid `(gh, gw)`.
    """
    gh, gw = grid
    h, w = masks.shape[-2:]
    if h < gh or w < gw:
        raise ValueError(f"masks of {h}x{w} pixels are smaller than the {gh}x{gw} patch grid")
    ry = _assignment(h, gh, masks.device)  # [gh, H]
    rx = _assignment(w, gw, masks.device)  # [gw, W]
    inside = torch.einsum("ih,phw,jw->pij", ry, masks.to(torch.float64), rx)
    total = ry.sum(1)[:, None] * rx.sum(1)[None, :]
    return inside, total


def grid_pointing_game(maps: Tensor, cell_masks: Tensor) -> Tensor:
    """Grid pointing game `[P]` (Rao et al., "Towards Better Understanding Attribution Methods", CVPR 2022).

    Score = positive attribution inside the target's grid cell / total positive attribution, over pixels of
    the nearest-upsampled map (patch value x pixels of the patch inside the cell, over patch value x pixels of
    the patch), in [0, 1]; 1 / (number of cells) is chance for a uniform map.

    Args:
        maps: `[P, gh, gw]` patch-grid attributions (signed; only the positive part counts).
        cell_masks: `[P, H, W]` bool, the target class's cell.

    Returns:
        `[P]` float64; NaN where the map has no positive value (the score is undefined) or a non-finite entry.
    """
    if maps.shape[0] != cell_masks.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {cell_masks.shape[0]} masks")
    inside, total = mask_patch_counts(cell_masks, tuple(maps.shape[-2:]))
    pos = maps.to(torch.float64).clamp_min(0)  # NaN stays NaN; -inf would become 0, hence `finite`
    num = (pos * inside).flatten(1).sum(1)
    den = (pos * total).flatten(1).sum(1)
    ok = (den > 0) & torch.isfinite(maps.flatten(1)).all(1)
    return torch.where(ok, num / den.where(ok, torch.ones_like(den)), torch.full_like(den, float("nan")))


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game hits `[P]` (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).

    1.0 when the arg-max patch of the map covers at least one mask pixel, else 0.0; ties go to the first
    maximum in row-major order; no tolerance margin. Works for any masks: the target's cell (a coarse,
    GridPG-style hit) or the object's pixels.

    Args:
        maps: `[P, gh, gw]` patch-grid attributions.
        masks: `[P, H, W]` bool target masks.

    Returns:
        `[P]` float64 in {0, 1}; NaN for a map with a non-finite entry.
    """
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {masks.shape[0]} masks")
    inside, _ = mask_patch_counts(masks, tuple(maps.shape[-2:]))
    flat = maps.reshape(maps.shape[0], -1)
    best = flat.argmax(1)  # first maximum
    hit = (inside.flatten(1).gather(1, best[:, None]).squeeze(1) > 0).to(torch.float64)
    finite = torch.isfinite(flat).all(1)
    return torch.where(finite, hit, torch.full_like(hit, float("nan")))
