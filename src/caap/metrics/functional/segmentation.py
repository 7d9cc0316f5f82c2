"""Segmentation scores of attribution maps: the Gur et al. / Chefer et al. protocol and LibraGrad's per-image AP.

Gur et al. ("Visualization of Supervised and Self-Supervised Neural Networks via Attribution Guided
Factorization", AAAI 2021) and Chefer et al. ("Transformer Interpretability Beyond Attention Visualization",
CVPR 2021, `imagenet_seg_eval.py`) score a map as a binary foreground / background segmentation:

1. the patch map is upsampled to the image bilinearly (Chefer: `interpolate(scale_factor=16, mode='bilinear')`),
2. min-max normalised to [0, 1] (a constant map becomes all zeros: their code zeroes the NaNs of 0 / 0),
3. binarised at its mean: foreground where the normalised map is strictly above its mean, background elsewhere,
4. pixel accuracy = correct / labelled pixels and IoU per class (background, foreground), both accumulated
   over the whole dataset (sums of counts, then the ratio; mIoU = mean of the two IoUs),
5. mAP = mean over images of the average precision of the two-channel soft prediction `[1 - m, m]` against
   the one-hot ground truth `[background, foreground]`, all 2 x H x W entries pooled (their `get_ap_scores`).

LibraGrad (CVPR 2025) reports "Segmentation AP": per image, the binary average precision of the upsampled
signed map against the class mask (the ranking of pixels by attribution), averaged over images.

Average precision is torchmetrics' exact (threshold-free) AP, equal to scikit-learn's
`average_precision_score`; the P images of a batch are scored at once as P labels of a multilabel problem.
Pixels marked invalid (IGNORE) count nowhere.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multilabel_average_precision

INTERPOLATIONS = ("bilinear", "nearest")


def upsample_maps(maps: Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> Tensor:
    """Patch maps `[P, gh, gw]` to pixel maps `[P, H, W]` (float32; bilinear with align_corners=False as
    Chefer et al., or nearest)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got '{interpolation}'")
    x = maps.float()[:, None]
    if interpolation == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0]
    return F.interpolate(x, size=size, mode="nearest")[:, 0]


def minmax_normalise(maps: Tensor) -> Tensor:
    """Per-map min-max normalisation of `[P, ...]` to [0, 1]; a constant map becomes all zeros (Chefer et al.
    zero the NaNs of 0 / 0); a map with a non-finite entry stays NaN everywhere."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    span = (hi - lo)[:, None]
    out = torch.where(span > 0, (flat - lo[:, None]) / span.where(span > 0, torch.ones_like(span)), 0.0)
    finite = torch.isfinite(flat).all(1, keepdim=True)
    return torch.where(finite, out, torch.full_like(out, float("nan"))).reshape(maps.shape)


def mean_threshold(maps: Tensor) -> Tensor:
    """Binary foreground `[P, H, W]` (bool): pixels strictly above the map's mean (Gur et al.)."""
    flat = maps.flatten(1)
    return (flat > flat.mean(1, keepdim=True)).reshape(maps.shape)


def segmentation_counts(
    maps: Tensor,
    masks: Tensor,
    valid: Tensor | None = None,
    interpolation: str = "bilinear",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image counts of the Gur et al. protocol.

    Args:
        maps: `[P, gh, gw]` patch-grid attributions.
        masks: `[P, H, W]` bool foreground (the target's object).
        valid: `[P, H, W]` bool pixels that count (None: all).
        interpolation: upsampling of the map to the masks' size.

    Returns:
        `(correct [P], labelled [P], intersection [P, 2], union [P, 2])` float64, classes ordered
        (background, foreground); all NaN for a map with a non-finite entry.
    """
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {masks.shape[0]} masks")
    valid = torch.ones_like(masks, dtype=torch.bool) if valid is None else valid.bool()
    norm = minmax_normalise(upsample_maps(maps, (masks.shape[-2], masks.shape[-1]), interpolation))
    pred = mean_threshold(norm)
    gt = masks.bool()
    correct = ((pred == gt) & valid).flatten(1).sum(1)
    labelled = valid.flatten(1).sum(1)
    inter = torch.stack([(~pred & ~gt & valid), (pred & gt & valid)], 1).flatten(2).sum(2)
    union = torch.stack([((~pred | ~gt) & valid), ((pred | gt) & valid)], 1).flatten(2).sum(2)
    finite = torch.isfinite(maps.flatten(1)).all(1)
    nan = float("nan")
    return (
        torch.where(finite, correct.double(), nan),
        torch.where(finite, labelled.double(), nan),
        torch.where(finite[:, None], inter.double(), nan),
        torch.where(finite[:, None], union.double(), nan),
    )


def pixel_accuracy(correct: Tensor, labelled: Tensor) -> Tensor:
    """Pixel accuracy `correct / labelled` (per image for `[P]` counts; NaN with no labelled pixel)."""
    return torch.where(labelled > 0, correct / labelled.clamp_min(1), float("nan"))


def mean_iou(inter: Tensor, union: Tensor) -> Tensor:
    """Mean over (background, foreground) of intersection / union, `[..., 2] -> [...]`; a class with an empty
    union (absent from both prediction and truth) is left out of the mean; NaN when both are."""
    iou = torch.where(union > 0, inter / union.clamp_min(1), float("nan"))
    return iou.nanmean(-1)


def _per_image_ap(scores: Tensor, target: Tensor) -> Tensor:
    """AP `[P]` of scores `[P, N]` against binary targets `[P, N]` (-1 = ignored); NaN for a non-finite score
    row or a row without a positive."""
    finite = torch.isfinite(scores).all(1)
    positives = (target == 1).any(1)
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=scores.device)
    p = scores.shape[0]
    if p == 1:  # torchmetrics' multilabel AP needs two labels or more: score the row twice
        scores, target = scores.expand(2, -1), target.expand(2, -1)
    with warnings.catch_warnings():  # rows without positives are set to NaN below
        warnings.filterwarnings("ignore", message="No positive samples")
        ap = multilabel_average_precision(
            torch.nan_to_num(scores.double()).T.contiguous(),
            target.long().T.contiguous(),
            num_labels=scores.shape[0],
            average="none",
            ignore_index=-1,
        )
    ap = ap.reshape(-1)[:p].to(torch.float64)
    return torch.where(finite & positives, ap, float("nan"))


def gur_average_precision(
    maps: Tensor, masks: Tensor, valid: Tensor | None = None, interpolation: str = "bilinear"
) -> Tensor:
    """Per-image AP `[P]` of the Gur et al. / Chefer et al. protocol: the min-max normalised upsampled map `m`
    as the two-channel prediction `[1 - m, m]` against the one-hot truth `[background, foreground]`, all
    2 x H x W entries pooled (Chefer's `get_ap_scores`). NaN for a non-finite map."""
    norm = minmax_normalise(upsample_maps(maps, (masks.shape[-2], masks.shape[-1]), interpolation)).flatten(1)
    gt = masks.bool().flatten(1).long()
    ok = torch.ones_like(gt, dtype=torch.bool) if valid is None else valid.bool().flatten(1)
    scores = torch.cat([1 - norm, norm], 1)
    target = torch.cat([torch.where(ok, 1 - gt, -1), torch.where(ok, gt, -1)], 1)
    return _per_image_ap(scores, target)


def segmentation_average_precision(
    maps: Tensor, masks: Tensor, valid: Tensor | None = None, interpolation: str = "bilinear"
) -> Tensor:
    """LibraGrad's Segmentation AP `[P]`: binary AP of the upsampled signed map's pixels against the target's
    mask. NaN for a non-finite map or an empty mask (no positive pixel: AP is undefined)."""
    pixels = upsample_maps(maps, (masks.shape[-2], masks.shape[-1]), interpolation).flatten(1)
    gt = masks.bool().flatten(1).long()
    if valid is not None:
        gt = torch.where(valid.bool().flatten(1), gt, -1)
    return _per_image_ap(pixels, gt)
