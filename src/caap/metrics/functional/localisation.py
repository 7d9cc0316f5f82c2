"""Localisation scores of patch-grid maps against pixel masks, beyond the plain pointing games.

- `tolerant_pointing_game`: the pointing game with a tolerance margin (Zhang et al., ECCV 2016: "a hit is
  counted if the maximum point lies on the annotated object, with a 15-pixel tolerance").
- `positive_energy_share` / `energy_pointing_game`: energy-based pointing game (Wang et al., "Score-CAM",
  CVPRW 2020): the share of the map's positive energy inside the target's bounding box (or mask).
- `class_discrimination`: the share of the positive attribution for class A that lands on the cells of the
  *other* classes of a multi-object image (lower is better; LibraGrad's co-occurring-animals setting, made a
  number on FashionGrid grids).
- `bounding_boxes`: the box around each mask.

Like `pointing.py`, maps are read in pixels as their nearest-neighbour upsampling and the scores are computed
exactly on the patch grid from per-patch pixel counts. NaN marks an undefined value (no positive attribution,
a non-finite map, an empty region); the metric wrappers skip, count and log those.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.metrics.functional.pointing import mask_patch_counts

DEFAULT_TOLERANCE = 15  # pixels, Zhang et al. 2016


def _check_pairs(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected maps [P, gh, gw] and masks [P, H, W] with the same P; "
            f"got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )


def _owner(size: int, cells: int, device: torch.device) -> Tensor:
    """`[size]` patch coordinate of each pixel coordinate under nearest upsampling (as `pointing.py`)."""
    return torch.div(torch.arange(size, device=device) * cells, size, rounding_mode="floor")


def _gap_to_block(owner: Tensor, block: Tensor) -> Tensor:
    """`[P, S]` pixel distance along one axis from each coordinate to the pixel span of patch `block[p]`."""
    idx = torch.arange(owner.numel(), device=owner.device)
    inside = owner[None, :] == block[:, None]
    lo = torch.where(inside, idx, owner.numel()).amin(1, keepdim=True)
    hi = torch.where(inside, idx, -1).amax(1, keepdim=True)
    return ((lo - idx).clamp_min(0) + (idx - hi).clamp_min(0)).to(torch.float64)


def tolerant_pointing_game(maps: Tensor, masks: Tensor, tolerance: float = DEFAULT_TOLERANCE) -> Tensor:
    """Pointing game with a tolerance `[P]` (Zhang et al., "Top-down Neural Attention by Excitation Backprop",
    ECCV 2016, which allows 15 pixels).

    The maximum point of a patch-grid map is its arg-max patch (ties: first in row-major order), i.e. that
    patch's block of pixels in the nearest-upsampled map. A hit (1.0) when some mask pixel lies within
    `tolerance` pixels (Euclidean) of that block, else 0.0. `tolerance=0` is the plain `pointing_game`.
    Computed exactly from each pixel's distance to the block (O(P x H x W), no dilation).

    Args:
        maps: `[P, gh, gw]` patch-grid attributions.
        masks: `[P, H, W]` bool target masks (the object's pixels).
        tolerance: margin in pixels of the image the masks belong to.

    Returns:
        `[P]` float64 in {0, 1}; NaN for a map with a non-finite entry or an empty mask (nothing to point at).
    """
    _check_pairs(maps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    (gh, gw), (h, w) = maps.shape[-2:], masks.shape[-2:]
    if h < gh or w < gw:
        raise ValueError(f"masks of {h}x{w} pixels are smaller than the {gh}x{gw} patch grid")
    flat = maps.reshape(maps.shape[0], -1)
    best = torch.nan_to_num(flat, nan=-torch.inf).argmax(1)  # first maximum
    dy = _gap_to_block(_owner(h, gh, masks.device), best.to(masks.device) // gw)  # [P, H]
    dx = _gap_to_block(_owner(w, gw, masks.device), best.to(masks.device) % gw)  # [P, W]
    near = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= float(tolerance) ** 2  # [P, H, W]
    hit = (near & masks.bool()).flatten(1).any(1).to(torch.float64).to(maps.device)
    defined = torch.isfinite(flat).all(1) & masks.flatten(1).any(1).to(maps.device)
    return torch.where(defined, hit, torch.full_like(hit, float("nan")))


def positive_energy_share(maps: Tensor, regions: Tensor) -> Tensor:
    """Share of the positive attribution energy inside `regions` `[P]`, exact on the nearest-upsampled map:
    sum over pixels in the region of max(map, 0) / sum over all pixels of max(map, 0).

    Args:
        maps: `[P, gh, gw]` patch-grid attributions (signed; only the positive part counts).
        regions: `[P, H, W]` bool pixel regions.

    Returns:
        `[P]` float64 in [0, 1]; NaN where the map has no positive value or a non-finite entry.
    """
    _check_pairs(maps, regions)
    inside, total = mask_patch_counts(regions, tuple(maps.shape[-2:]))
    pos = maps.to(torch.float64).clamp_min(0)  # NaN stays NaN; -inf would become 0, hence `finite`
    num = (pos * inside).flatten(1).sum(1)
    den = (pos * total).flatten(1).sum(1)
    ok = (den > 0) & torch.isfinite(maps.flatten(1)).all(1)
    return torch.where(ok, num / den.where(ok, torch.ones_like(den)), torch.full_like(den, float("nan")))


def bounding_boxes(masks: Tensor) -> Tensor:
    """The filled bounding box `[P, H, W]` (bool) of each mask `[P, H, W]`; empty for an empty mask."""
    masks = masks.bool()
    rows, cols = masks.any(2), masks.any(1)  # [P, H], [P, W]

    def span(occupied: Tensor) -> Tensor:
        n = occupied.shape[1]
        idx = torch.arange(n, device=occupied.device)
        first = torch.where(occupied, idx, n).amin(1, keepdim=True)
        last = torch.where(occupied, idx, -1).amax(1, keepdim=True)
        return (idx >= first) & (idx <= last)

    return span(rows)[:, :, None] & span(cols)[:, None, :]


def energy_pointing_game(maps: Tensor, masks: Tensor, region: str = "box") -> Tensor:
    """Energy-based pointing game `[P]` (Wang et al., "Score-CAM", CVPR Workshops 2020, section 4.3).

    Proportion = positive energy inside the target's bounding box / total positive energy of the map (Score-CAM
    reads its saliency maps after a ReLU; a signed map contributes its positive part). `region='mask'` uses the
    mask itself instead of its box (Quantus' relevance mass accuracy for non-negative maps).

    Args:
        maps: `[P, gh, gw]` patch-grid attributions.
        masks: `[P, H, W]` bool target masks.
        region: 'box' (Score-CAM) or 'mask'.

    Returns:
        `[P]` float64 in [0, 1]; NaN where the map has no positive value, a non-finite entry, or the mask is empty.
    """
    if region not in ("box", "mask"):
        raise ValueError(f"region must be 'box' or 'mask', got '{region}'")
    regions = bounding_boxes(masks) if region == "box" else masks.bool()
    share = positive_energy_share(maps, regions)
    return torch.where(regions.flatten(1).any(1), share, torch.full_like(share, float("nan")))


def class_discrimination(maps: Tensor, class_masks: Tensor, classes: Tensor) -> Tensor:
    """Class discrimination `[P]`: share of the positive attribution for the target class that lands on the
    regions (cells) of the *other* classes present in the image; lower is better, 0 is perfect.

    The GridPG reading (Rao et al., CVPR 2022) of LibraGrad's co-occurring-classes evaluation: a map explaining
    class A should put nothing on class B's cell. Only images holding two or more classes have a value.

    Args:
        maps: `[P, gh, gw]` patch-grid attributions for class `classes[p]`.
        class_masks: `[P, C, H, W]` bool per-class regions of each pair's image (a class is present when its
            region is non-empty).
        classes: `[P]` long target class.

    Returns:
        `[P]` float64 in [0, 1]; NaN where the image holds fewer than two classes, or the map has no positive
        value or a non-finite entry.
    """
    if class_masks.ndim != 4 or class_masks.shape[0] != maps.shape[0]:
        raise ValueError(
            f"expected class masks [P, C, H, W] with P={maps.shape[0]}, got {tuple(class_masks.shape)}"
        )
    class_masks = class_masks.bool()
    present = class_masks.flatten(2).any(2)  # [P, C]
    own = torch.nn.functional.one_hot(classes.long(), class_masks.shape[1]).bool()
    others = present & ~own
    other_regions = (class_masks & others[:, :, None, None]).any(1)  # [P, H, W]
    share = positive_energy_share(maps, other_regions)
    return torch.where(others.any(1), share, torch.full_like(share, float("nan")))
