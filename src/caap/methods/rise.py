"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das and Saenko, BMVC 2018).

`num_masks` random binary grids of `s x s` cells (each cell kept with probability `p`) are upsampled
bilinearly to `(s + 1) * cell` pixels and cropped at a random shift in `[0, cell)` on each axis, which gives
smooth masks `M_m` in [0, 1] at image size; the cell is `cell_size` patches (2 patches of 16 px on a 224 px
ViT-B/16 gives the paper's s = 7). The images are multiplied by the masks and the saliency is `sum_m score_m * M_m / (num_masks * p)`, with `score_m` the target
probability (or logit) of the masked image. The pixel saliency is averaged over each patch's pixels.
Masked pixels take `masked_value`: `mean` (default, the official code: `RISE.forward` in eclique/RISE
`explanations.py` multiplies the masks into the normalised tensor, so a masked pixel becomes the
normalisation mean colour, `M x + (1 - M) mean` in pixel space) or `black` (`M x` in pixel space).
The paper's saliency carries a constant offset (about the mean score) that ranking metrics ignore but
positive-mass metrics (the grid pointing game) do not: `centered=true` subtracts the mean score of the
image's masked copies from every `score_m` (the covariance of score and mask, divided by p), an option of
ours; the default is the paper's form.

Seeded: the masks are a pure function of `seed` and the image size, and every image of every batch uses the
same masks (maps do not depend on batching). Batched: `batch_size` masked images (images x masks) per
forward; masks are built chunk by chunk from their low-resolution grids, so memory does not grow with
`num_masks`. Cost: `num_masks` forwards per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int, check_probability
from caap.methods.patches import pool_to_patches
from caap.models.vit import ViTClassifier
from caap.scores import PROB_OR_LOGIT, check_score, target_score

MASKED_VALUES: tuple[str, ...] = ("mean", "black")
"""What masked pixels become: the model's normalisation mean colour (official RISE) or black."""


class RiseMasks:
    """The low-resolution grids and shifts of `num_masks` RISE masks; `build(idx)` gives `[len(idx), H, W]`."""

    def __init__(self, num_masks: int, height: int, width: int, cell: int, p: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.height, self.width, self.cell = height, width, cell
        sh, sw = math.ceil(height / cell), math.ceil(width / cell)
        self.grids = (torch.rand(num_masks, 1, sh + 1, sw + 1, generator=g) < p).float()
        self.dy = torch.randint(0, cell, (num_masks,), generator=g)
        self.dx = torch.randint(0, cell, (num_masks,), generator=g)

    def build(self, idx: Tensor, device: torch.device) -> Tensor:
        grids = self.grids[idx].to(device)
        up = F.interpolate(
            grids,
            size=(grids.shape[-2] * self.cell, grids.shape[-1] * self.cell),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        rows = (self.dy[idx, None] + torch.arange(self.height)).to(device)  # [n, H]
        cols = (self.dx[idx, None] + torch.arange(self.width)).to(device)  # [n, W]
        n = torch.arange(idx.numel(), device=device)
        return up[n[:, None, None], rows[:, :, None], cols[:, None, :]]


class RISE(AttributionMethod):
    """RISE saliency pooled to the patch grid, `[B, gh, gw]`."""

    requires_grad = False
    name = "rise"

    def __init__(
        self,
        num_masks: int = 1000,
        cell_size: int = 2,
        p: float = 0.5,
        score: str = "prob",
        batch_size: int = 256,
        seed: int = 0,
        centered: bool = False,
        masked_value: str = "mean",
    ) -> None:
        if masked_value not in MASKED_VALUES:
            raise ValueError(
                f"method.masked_value={masked_value!r} is not supported; allowed: {list(MASKED_VALUES)}"
            )
        self.masked_value = masked_value
        if not isinstance(centered, bool):
            raise ValueError(f"method.centered={centered!r} must be true or false")
        self.centered = centered
        self.num_masks = check_positive_int("num_masks", num_masks)
        self.cell_size = check_positive_int("cell_size", cell_size)
        self.p = check_probability("p", p)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = int(seed)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        b, _, h, w = images.shape
        ph, pw = model.patch_size
        masks = RiseMasks(self.num_masks, h, w, self.cell_size * max(ph, pw), self.p, self.seed)
        saliency = images.new_zeros(b, h, w, dtype=torch.float32)
        coverage = images.new_zeros(h, w, dtype=torch.float32)  # sum of the masks
        score_sum = images.new_zeros(b, dtype=torch.float32)
        per_chunk = max(1, self.batch_size // b)
        fill = model.mean.to(images) * (self.masked_value == "mean")  # [1, 3, 1, 1] what masked pixels become
        for s in range(0, self.num_masks, per_chunk):
            idx = torch.arange(s, min(s + per_chunk, self.num_masks))
            m = masks.build(idx, images.device).to(images.dtype)  # [n, H, W]
            keep = m[None, :, None]  # [1, n, 1, H, W]
            x = images[:, None] * keep + (1 - keep) * fill[:, None]  # [B, n, 3, H, W]
            x = x.flatten(0, 1)  # [B*n, 3, H, W], image-major
            logits = model(x).float()
            scores = target_score(logits, target.repeat_interleave(idx.numel()), self.score, model.multilabel)
            saliency += torch.einsum("bn,nhw->bhw", scores.reshape(b, -1), m.float())
            coverage += m.float().sum(0)
            score_sum += scores.reshape(b, -1).sum(1)
        if self.centered:  # sum_m (score_m - mean score) * M_m: the covariance form, no constant offset
            saliency -= (score_sum / self.num_masks)[:, None, None] * coverage
        saliency /= self.num_masks * self.p
        return pool_to_patches(saliency, model, images)
