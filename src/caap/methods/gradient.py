"""Gradient (saliency) on the token embeddings, and the shared base of the gradient family.

Every gradient method takes `libragrad: false | true | <preset>` (see `caap.methods.libragrad`) and
`score: null | logit | prob`. `score=null` differentiates the logit for plain gradients and the preset's head
under LibraGrad (the probability for `true`/`full`, the logit for `wo_head` and `attnlrp`).

`Gradient` maps patch i to the L2 norm over channels of `dS/dr_0[i]` (`reduce=norm`, the default: the
token-level form of Simonyan et al.'s saliency magnitude; the channel directions of r_0 carry no sign
convention, so a signed sum of a bare gradient mixes unrelated directions), or to the signed channel sum
`sum_d dS/dr_0[i, d]` (`reduce=sum`). It is not an attribution that sums to the score, so it has no
completeness terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.libragrad import libragrad, plan_hooks, resolve_libragrad, resolve_score
from caap.models.vit import ViTClassifier
from caap.scores import target_score


class GradientFamily(AttributionMethod):
    """Shared options of the gradient methods: the LibraGrad rules and the differentiated target score."""

    requires_grad = True

    def __init__(self, score: str | None = None, libragrad: bool | str = False) -> None:
        self.rules = resolve_libragrad(libragrad)
        self.libragrad = self.rules.name if self.rules is not None else False
        self.score = resolve_score(score, self.rules)

    def setup(self, model: ViTClassifier) -> None:
        """Fail before any data when the LibraGrad rules have no rule for a module of `model`."""
        if self.rules is not None:
            plan_hooks(model, self.rules)

    def target_scores(self, model: ViTClassifier, logits: Tensor, target: Tensor) -> Tensor:
        """The differentiated score `[B]` (target logit or probability)."""
        return target_score(logits, target, self.score, model.multilabel)

    def rewired(self, model: ViTClassifier):
        """The LibraGrad context of this method (a no-op for plain gradients)."""
        return libragrad(model, self.rules)

    def embed_leaf(self, model: ViTClassifier, images: Tensor) -> Tensor:
        """r_0 `[B, T, D]` as a leaf that requires grad (the embedding itself is not differentiated)."""
        with torch.no_grad():
            r0 = model.embed(images)
        return r0.detach().requires_grad_(True)

    @staticmethod
    def to_grid(model: ViTClassifier, images: Tensor, per_token: Tensor) -> Tensor:
        """Per-token values `[B, T]` to the patch grid `[B, gh, gw]` (prefix tokens dropped), float32."""
        gh, gw = model.grid_size(images)
        return per_token[:, model.num_prefix_tokens :].float().reshape(-1, gh, gw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score!r}, libragrad={self.libragrad!r})"


class Gradient(GradientFamily):
    """`||dS/dr_0[i]||_2` (or the signed channel sum) per patch token, batched over images."""

    name = "gradient"

    def __init__(self, score: str | None = None, libragrad: bool | str = False, reduce: str = "norm") -> None:
        super().__init__(score=score, libragrad=libragrad)
        if reduce not in ("norm", "sum"):
            raise ValueError(f"method.reduce='{reduce}' is not supported; allowed: ['norm', 'sum']")
        self.reduce = reduce

    def gradient(self, model: ViTClassifier, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(r_0, dS/dr_0), both `[B, T, D]`."""
        r0 = self.embed_leaf(model, images)
        with self.rewired(model):
            scores = self.target_scores(model, model.head(model.forward_blocks(r0)), target)
            # samples are independent (no batch statistics): the gradient of the sum is per sample
            (grad,) = torch.autograd.grad(scores.sum(), r0)
        return r0.detach(), grad

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        _, grad = self.gradient(model, images, target)
        per_token = grad.norm(dim=-1) if self.reduce == "norm" else grad.sum(-1)
        return self.to_grid(model, images, per_token)
