"""Input x Gradient on the token embeddings (Shrikumar et al. 2016; the token-level form LibraGrad uses).

The attribution of patch i is `sum_d r_0[i, d] * dS/dr_0[i, d]`, signed, where r_0 are the token embeddings
(after patch embed, prefix tokens and position embedding) and S the target score. Written by hand rather than
with Captum's InputXGradient because the input is an internal tensor (r_0), not the image; a test checks the
two agree when Captum is pointed at the same tensor.

`libragrad: false | true | <preset>` differentiates through the LibraGrad backward rules
(`caap.methods.libragrad`); `score: null` means the logit for plain gradients and the preset's head under
LibraGrad. With the `attnlrp` preset this is AttnLRP written as a modified gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.gradient import GradientFamily
from caap.models.vit import ViTClassifier


class InputXGradient(GradientFamily):
    """Signed channel sum of `r_0 * grad` over the patch tokens, `[B, gh, gw]`, batched over images."""

    name = "input_x_gradient"

    def __init__(self, score: str | None = None, libragrad: bool | str = False) -> None:
        super().__init__(score=score, libragrad=libragrad)

    def token_relevance(self, model: ViTClassifier, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(`sum_d r_0 * grad` for every token `[B, T]`, prefix tokens included; the score `[B]`)."""
        r0 = self.embed_leaf(model, images)
        with self.rewired(model):
            scores = self.target_scores(model, model.head(model.forward_blocks(r0)), target)
            (grad,) = torch.autograd.grad(scores.sum(), r0)
        return (r0.detach() * grad).sum(-1), scores.detach()

    def completeness_terms(
        self, model: ViTClassifier, images: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(sum of all token attributions `[B]`, the differentiated score `[B]` it would equal if complete)."""
        relevance, scores = self.token_relevance(model, images, target)
        return relevance.sum(-1), scores

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        relevance, _ = self.token_relevance(model, images, target)
        return self.to_grid(model, images, relevance)
