"""GenAtt (Chefer et al., ICCV 2021, "Generic attention-model explainability"): gradient-weighted rollout.

Per block, `Abar = mean_heads ReLU(A * dS/dA)` with A the attention probabilities; relevance
`R = prod_l (0.5 I + 0.5 Abar_l)` (in block order, R <- (0.5 I + 0.5 Abar) R); the map is the row of the pooled
token: the CLS row for token pooling, the mean of the patch rows for average pooling (timm pools patch tokens),
restricted to the patch columns. `0.5 (I + Abar)` is Chefer's `I + Abar` update scaled by 1/2 per block, i.e.
the same map times 0.5^L. Attention matrices are needed, so fused attention is switched off inside the method
only (restored after, even on errors). `libragrad` and `score` as in the gradient family: under LibraGrad,
dS/dA is taken through the rewired backward (A itself is a constant there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers.attention import Attention
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from caap.methods._hooks import attention_readout, readout_rows
from caap.methods.gradient import GradientFamily
from caap.models.vit import ViTClassifier


@contextmanager
def unfused_attention(model: ViTClassifier) -> Iterator[list[Attention]]:
    """Every block's timm Attention with fused SDPA off; the previous settings come back on exit."""
    attns = _attentions(model)
    before = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield attns
    finally:
        for a, flag in zip(attns, before, strict=True):
            a.fused_attn = flag


def _attentions(model: ViTClassifier) -> list[nn.Module]:
    """Every block's attention module; a clear error for models without timm `Attention` / `EvaAttention`."""
    readout_rows(model)  # no attention at all (MLP-Mixer): a clear error
    attns = [block.attn for block in model.blocks]
    for a in attns:
        if type(a) not in (Attention, EvaAttention):
            raise NotImplementedError(
                f"GenAtt on model '{model.name}': attention {type(a).__name__} is not timm.layers.Attention "
                f"or EvaAttention"
            )
    return attns


class GenAtt(GradientFamily):
    name = "genatt"

    def setup(self, model: ViTClassifier) -> None:
        super().setup(model)
        _attentions(model)
        if model.pooling in ("max", "avgmax"):
            raise ValueError(
                f"GenAtt supports token, avg and CLS + mean pooling; model '{model.name}' pools with "
                f"'{model.pooling}'"
            )

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        self.setup(model)
        with torch.no_grad():
            r0 = model.embed(images)
        maps: list[Tensor] = []

        def capture(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            # under LibraGrad A is built from detached q, k: give it a leaf so dS/dA still exists
            a = out if out.requires_grad else out.detach().requires_grad_(True)
            maps.append(a)
            return a

        with unfused_attention(model) as attns, self.rewired(model):
            handles = [a.attn_drop.register_forward_hook(capture) for a in attns]
            try:
                logits = model.head(model.forward_blocks(r0))
            finally:
                for handle in handles:
                    handle.remove()
            scores = self.target_scores(model, logits, target)
            grads = torch.autograd.grad(scores.sum(), maps, allow_unused=True)
        b, t = r0.shape[:2]
        eye = torch.eye(t, dtype=r0.dtype, device=r0.device).expand(b, t, t)
        rel = eye.clone()
        for a, g in zip(maps, grads, strict=True):
            if g is None:  # a block the score does not depend on
                continue
            abar = (a.detach() * g).clamp(min=0).mean(1)
            rel = (0.5 * (eye + abar)) @ rel
        gh, gw = model.grid_size(images)
        return attention_readout(model, rel).float().reshape(-1, gh, gw)
