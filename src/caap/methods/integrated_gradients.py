"""Integrated Gradients (Sundararajan et al. 2017) on the token embeddings r_0, batched over steps.

`IG(x)[t, d] = (x - x')[t, d] * integral_0^1 dS/dr_0(x' + a (x - x'))[t, d] da`, summed over channels per
token (signed), with x = r_0 of the image and x' a token reference (`caap.references`): `zero_tokens` (the
official choice, in the standard definition) or the r_0 of a reference image such as `black` (its prefix tokens
and position embeddings equal the input's, so only the patch content is integrated). The integral is a quadrature with `steps` points: `gausslegendre` (Captum's default),
`riemann_trapezoid`, `riemann_middle`, `riemann_left`, `riemann_right`; `steps_per_batch` interpolation
steps of all images run in one pass. Completeness: the total equals S(x) - S(x') up to quadrature error
(exactly, for any quadrature, when the rewired network is affine, i.e. LibraGrad with a logit head).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caap.methods.gradient import GradientFamily
from caap.models.vit import ViTClassifier
from caap.references import ZERO_TOKENS, build_token_reference, reference_tokens

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
BASELINES = (ZERO_TOKENS, "black", "mean_color", "blur")
"""The token references IG integrates from (`caap.references`)."""


def quadrature(steps: int, rule: str) -> tuple[Tensor, Tensor]:
    """(alphas `[steps]`, weights `[steps]`) on [0, 1], float64."""
    if rule == "gausslegendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * node_weights)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return alphas, w
    k = torch.arange(steps, dtype=torch.float64)
    offset = {"riemann_middle": 0.5, "riemann_left": 0.0, "riemann_right": 1.0}[rule]
    return (k + offset) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


class IntegratedGradients(GradientFamily):
    """Token-level Integrated Gradients `[B, gh, gw]`; `libragrad` and `score` as in the gradient family."""

    name = "integrated_gradients"

    def __init__(
        self,
        score: str | None = None,
        libragrad: bool | str = False,
        steps: int = 50,
        baseline: str | Mapping[str, Any] = ZERO_TOKENS,
        rule: str = "gausslegendre",
        steps_per_batch: int = 16,
    ) -> None:
        super().__init__(score=score, libragrad=libragrad)
        self.reference = build_token_reference(baseline, "method.baseline", BASELINES)
        if rule not in RULES:
            raise ValueError(f"method.rule='{rule}' is not supported; allowed: {list(RULES)}")
        if steps < 1 or steps_per_batch < 1:
            raise ValueError("method.steps and method.steps_per_batch must be >= 1")
        self.steps, self.baseline, self.rule, self.steps_per_batch = (
            int(steps),
            baseline,
            rule,
            int(steps_per_batch),
        )

    def token_relevance(self, model: ViTClassifier, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(per-token IG `[B, T]` incl. prefix tokens, S(x) - S(x') `[B]`)."""
        with torch.no_grad():
            r0 = model.embed(images)
            base = reference_tokens(model, images, self.reference)
        delta = r0 - base
        alphas, weights = quadrature(self.steps, self.rule)
        alphas, weights = alphas.to(r0), weights.to(r0)
        avg_grad = torch.zeros_like(r0)
        b = r0.shape[0]
        with self.rewired(model):
            for i in range(0, self.steps, self.steps_per_batch):
                a, w = alphas[i : i + self.steps_per_batch], weights[i : i + self.steps_per_batch]
                k = a.shape[0]
                x = (base[None] + a[:, None, None, None] * delta[None]).reshape(k * b, *r0.shape[1:])
                x.requires_grad_(True)
                scores = self.target_scores(model, model.head(model.forward_blocks(x)), target.repeat(k))
                (grad,) = torch.autograd.grad(scores.sum(), x)
                avg_grad += (w[:, None, None, None] * grad.reshape(k, *r0.shape)).sum(0)
            with torch.no_grad():
                ends = self.target_scores(
                    model, model.head(model.forward_blocks(torch.cat([r0, base]))), target.repeat(2)
                )
        return (delta * avg_grad).sum(-1), ends[:b] - ends[b:]

    def completeness_terms(
        self, model: ViTClassifier, images: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(sum of all token attributions `[B]`, S(x) - S(baseline) `[B]`)."""
        relevance, reference = self.token_relevance(model, images, target)
        return relevance.sum(-1), reference

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        relevance, _ = self.token_relevance(model, images, target)
        return self.to_grid(model, images, relevance)
