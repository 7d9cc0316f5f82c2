"""FullGrad+ on tokens: Input x Gradient at r_0 plus every bias x gradient term, mapped to its token.

For a score S, the attribution of token t is

    sum_d r_0[t, d] dS/dr_0[t, d]  +  sum over biased layers l after r_0 of  sum_c b_l[c] dS/dy_l[t, c]

where y_l is the output of layer l (Linear layers and LayerNorm betas in the blocks, the final norm, fc_norm).
The position embedding, the patch-embedding bias and the prefix tokens are part of r_0 and counted by the
first term. Terms that belong to no token (the classifier bias, fc_norm after average pooling) and the
prefix-token terms are dropped from the map but counted in `completeness_terms`, whose total is the quantity
FullGrad-completeness speaks about: with LibraGrad and the logit as S it equals the logit (exactly, up to
floating point), because the rewired backward makes the network affine in (r_0, biases).

Bias gradients are read at each layer's output as the model sees it, i.e. after the LibraGrad substitution
of that output (a LayerNorm's beta gets the gradient of its rewired output; q/k projections get zero).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from caap.methods.gradient import GradientFamily
from caap.models.vit import ViTClassifier


def biased_layers(model: ViTClassifier) -> list[nn.Module]:
    """The layers after r_0 whose bias enters the residual computation: Linear and LayerNorm (with bias).

    Raises NotImplementedError for biases that enter without a module output to read their gradient from
    (EVA's `q_bias` / `v_bias`, added to the qkv projection inside `F.linear`) or in layers without a rule.
    """
    layers: list[nn.Module] = []
    for part in model.modules_after_embedding():
        for m in part.modules():
            if isinstance(getattr(m, "q_bias", None), nn.Parameter) or isinstance(
                getattr(m, "v_bias", None), nn.Parameter
            ):
                raise NotImplementedError(
                    f"FullGrad+ on model '{model.name}': {type(m).__name__} adds q_bias / v_bias inside its qkv "
                    f"F.linear, so their bias-gradient terms cannot be read off a layer output; FullGrad+ needs "
                    f"biases in Linear / LayerNorm modules (ViT, DeiT, DINOv2, CLIP, MLP-Mixer)"
                )
            bias = getattr(m, "bias", None)
            if not isinstance(bias, nn.Parameter):
                continue
            if not isinstance(m, (nn.Linear, nn.LayerNorm)):
                raise NotImplementedError(
                    f"FullGrad+ on model '{model.name}': no bias rule for {type(m).__name__}; "
                    f"supported: Linear, LayerNorm"
                )
            layers.append(m)
    return layers


class FullGradPlus(GradientFamily):
    """Token-level FullGrad+ (`[B, gh, gw]`), batched over images; `libragrad` and `score` as in the family."""

    name = "fullgrad_plus"

    def setup(self, model: ViTClassifier) -> None:
        super().setup(model)
        biased_layers(model)

    def terms(self, model: ViTClassifier, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(per-token attribution `[B, T]` incl. prefix tokens, token-less bias terms `[B]`, score `[B]`)."""
        r0 = self.embed_leaf(model, images)
        num_tokens = r0.shape[1]
        captured: list[tuple[Tensor, Tensor, bool]] = []
        mixing = model.token_mixing_modules()

        def capture(module: nn.Module, args: tuple, out: Tensor) -> None:
            if out.requires_grad:
                captured.append((cast(Tensor, module.bias), out, module in mixing))  # a biased_layers module

        with self.rewired(model):
            # registered after the LibraGrad hooks, so they see each layer's rewired output
            handles = [m.register_forward_hook(capture) for m in biased_layers(model)]
            try:
                logits = model.head(model.forward_blocks(r0))
            finally:
                for handle in handles:
                    handle.remove()
            scores = self.target_scores(model, logits, target)
            grads = torch.autograd.grad(
                scores.sum(), [r0] + [out for _, out, _ in captured], allow_unused=True
            )
        per_token = (r0.detach() * grads[0]).sum(-1)
        global_terms = torch.zeros_like(scores.detach())
        for (bias, _, token_mixing), grad in zip(captured, grads[1:], strict=True):
            if grad is None:
                continue
            if token_mixing:  # [B, D, X]: X = tokens (output layer) or hidden token-mixing units
                term = (grad * bias.detach()).sum(1)  # [B, X]
                if term.shape[1] == num_tokens and bias.shape[0] == num_tokens:
                    per_token = per_token + term
                else:
                    global_terms = global_terms + term.sum(1)
                continue
            term = (grad * bias.detach()).sum(-1)  # [B], [B, T] or [B, heads, T] (q/k norms)
            if term.ndim == 1:
                global_terms = global_terms + term
            elif term.ndim == 2 and term.shape[1] == num_tokens:
                per_token = per_token + term
            elif term.ndim == 3 and term.shape[2] == num_tokens:
                per_token = per_token + term.sum(1)
            else:
                raise RuntimeError(
                    f"FullGrad+: cannot map a bias term of shape {tuple(term.shape)} to tokens"
                )
        return per_token, global_terms, scores.detach()

    def completeness_terms(
        self, model: ViTClassifier, images: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(sum of every term `[B]`, the differentiated score `[B]` it equals when complete)."""
        per_token, global_terms, scores = self.terms(model, images, target)
        return per_token.sum(-1) + global_terms, scores

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        per_token, _, _ = self.terms(model, images, target)
        return self.to_grid(model, images, per_token)
