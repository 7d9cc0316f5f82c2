"""Input x Gradient on the token embeddings (Shrikumar et al. 2016; the token-level form LibraGrad uses).

The attribution of patch i is `sum_d r_0[i, d] * dS/dr_0[i, d]`, signed, where r_0 are the token embeddings
(after patch embed, prefix tokens and position embedding) and S the target score. Written by hand rather than
with Captum's InputXGradient because the input is an internal tensor (r_0), not the image; a test checks the
two agree when Captum is pointed at the same tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.models.vit import ViTClassifier

SCORES = ("logit", "prob")


def target_score(model: ViTClassifier, logits: Tensor, target: Tensor, score: str) -> Tensor:
    """The differentiated score `[B]`: the target logit or the target probability."""
    picked = logits if score == "logit" else model.probabilities(logits)
    return picked.gather(1, target[:, None]).squeeze(1)


class InputXGradient(AttributionMethod):
    """Signed channel sum of `r_0 * grad` over the patch tokens, `[B, gh, gw]`, batched over images."""

    requires_grad = True
    name = "input_x_gradient"

    def __init__(self, score: str = "logit") -> None:
        if score not in SCORES:
            raise ValueError(f"method.score='{score}' is not supported; allowed: {list(SCORES)}")
        self.score = score

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        r0 = model.embed(images).detach().requires_grad_(True)
        logits = model.head(model.forward_blocks(r0))
        scores = target_score(model, logits, target, self.score)
        # Samples are independent (no batch statistics), so the gradient of the sum is per-sample.
        (grad,) = torch.autograd.grad(scores.sum(), r0)
        relevance = (r0 * grad).sum(-1).float()
        gh, gw = model.grid_size(images)
        return model.patch_tokens(relevance[..., None])[..., 0].reshape(-1, gh, gw)
