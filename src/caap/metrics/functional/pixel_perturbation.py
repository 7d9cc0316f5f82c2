"""RISE pixel deletion / insertion curves (Petsiuk, Das and Saenko, "RISE", BMVC 2018), batched over steps.

The patch-grid map is upsampled to the image (`bilinear` by default, or `nearest`, which orders whole
patches) and the pixels are ranked by it (stable descending sort, ties by row-major pixel position). In K
steps, `round(k * H * W / K)` pixels are changed at step k (k = 0..K; Petsiuk et al. change W pixels a
step, i.e. K = H, the default here):

- deletion: start from the image and replace the top-ranked pixels by the baseline (`mean_color`: the
  model's mean colour, i.e. a zero input after normalisation, as in the RISE code). A faithful map drops the score
  fast: lower area is better.
- insertion: start from the baseline (`blur`: Gaussian blur, kernel 11, sigma 5, the RISE code's
  `gkern(11, 5)`) and put back the top-ranked pixels of the image. Higher area is better.

The curve is the target's probability (sigmoid for multi-label heads, softmax otherwise), logit or top-1
hit over x = k / K; its area by the trapezoid rule (RISE's `auc`). All (pair, step) images of a batch are
built on the fly and run in chunks of `max_batch` images; the unperturbed end is one shared forward.
A map with a non-finite entry gives a NaN curve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from caap.models.vit import ViTClassifier
from caap.references import ReferenceImage, build_reference
from caap.scores import Outcomes, target_outcomes

PIXEL_MODES: tuple[str, ...] = ("deletion", "insertion")
PIXEL_BASELINES: tuple[str, ...] = ("black", "mean_color", "blur")
"""The reference images the pixel paths accept (`caap.references`)."""
UPSAMPLING: tuple[str, ...] = ("bilinear", "nearest")
RISE_BLUR: dict[str, Any] = {"kind": "blur", "sigma": 5.0, "kernel_size": 11}


def pixel_ranks(maps: Tensor, size: tuple[int, int], upsample: str = "bilinear") -> Tensor:
    """Rank of every pixel `[P, H * W]` (0 = most attributed) of maps `[P, gh, gw]` upsampled to `size`."""
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample='{upsample}' is not supported; allowed: {list(UPSAMPLING)}")
    up = F.interpolate(
        torch.nan_to_num(maps.float())[:, None],
        size=size,
        mode=upsample,
        **({"align_corners": False} if upsample == "bilinear" else {}),
    )
    flat = up.reshape(maps.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return rank


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """Pixels changed after each of the `steps + 1` steps: `round(k * num_pixels / steps)`."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return [round(k * num_pixels / steps) for k in range(steps + 1)]


def pixel_reference(baseline: str | Mapping[str, Any]) -> ReferenceImage:
    """The reference image of a pixel-path `baseline`: `black`, `mean_color` (optional `rgb`; default the
    model's mean colour, a zero input after normalisation) or `blur` (optional `sigma`, `kernel_size`; default
    RISE's 11 / 5)."""
    options = {"kind": baseline} if isinstance(baseline, str) else dict(baseline)
    if options.get("kind") == "blur":
        options = {**RISE_BLUR, **options}
    return build_reference(options, "baseline", PIXEL_BASELINES)


def baseline_images(model: ViTClassifier, images: Tensor, baseline: str | Mapping[str, Any]) -> Tensor:
    """Baseline images `[P, 3, H, W]` of `pixel_reference(baseline)` for images `[P, 3, H, W]`."""
    base = pixel_reference(baseline).images(images, model)[0]  # [1 | P, 3, H, W]
    return base.expand_as(images).to(images.dtype)


@torch.no_grad()
def pixel_perturbation_outcomes(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    mode: str = "deletion",
    baseline: str | Mapping[str, Any] = "mean_color",
    steps: int | None = None,
    upsample: str = "bilinear",
    max_batch: int = 256,
    full: Outcomes | None = None,
) -> Outcomes:
    """`Outcomes` `[P, steps + 1]` along the RISE deletion or insertion path (see the module docstring).

    Args:
        images: `[P, 3, H, W]` in [0, 1]; maps `[P, gh, gw]` (any resolution, upsampled to H x W; pixel-level
            maps are used as they are); classes `[P]`.
        steps: K; None = H (W pixels a step at a square image, as RISE).
        full: the unperturbed outcomes `[P]` if already known (the image end of the path is not rerun).
    """
    if mode not in PIXEL_MODES:
        raise ValueError(f"mode='{mode}' is not supported; allowed: {list(PIXEL_MODES)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    device = next(model.parameters()).device
    images, maps, classes = images.to(device), maps.to(device), classes.to(device).long()
    p, _, h, w = images.shape
    k = h if steps is None else int(steps)
    counts = step_counts(h * w, k)
    if full is None:
        full = target_outcomes(model(images), classes, model.multilabel)
    res = Outcomes(*(torch.full((p, k + 1), float("nan"), device=device) for _ in range(3)))
    image_end = 0 if mode == "deletion" else k
    for dst, src in zip(res, full, strict=True):
        dst[:, image_end] = src
    if p == 0:
        return res
    base = baseline_images(model, images, baseline)
    rank = pixel_ranks(maps, (h, w), upsample)  # [P, HW]
    run_steps = [s for s in range(k + 1) if s != image_end]
    rows_pair = torch.arange(p, device=device).repeat(len(run_steps))
    rows_step = torch.tensor(run_steps, device=device).repeat_interleave(p)
    cnt = torch.tensor(counts, device=device)
    flat_img, flat_base = images.reshape(p, 3, h * w), base.reshape(p, 3, h * w)
    for s in range(0, rows_pair.numel(), max_batch):
        rp, rs = rows_pair[s : s + max_batch], rows_step[s : s + max_batch]
        changed = (rank[rp] < cnt[rs][:, None])[:, None, :]  # [B, 1, HW]
        if mode == "deletion":
            x = torch.where(changed, flat_base[rp], flat_img[rp])
        else:
            x = torch.where(changed, flat_img[rp], flat_base[rp])
        out = target_outcomes(model(x.reshape(-1, 3, h, w)), classes[rp], model.multilabel)
        for dst, src in zip(res, out, strict=True):
            dst[rp, rs] = src
    finite = torch.isfinite(maps.reshape(p, -1)).all(1)[:, None]
    return Outcomes(*(torch.where(finite, t, torch.full_like(t, float("nan"))) for t in res))
