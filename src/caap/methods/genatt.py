"""GenAtt (Chefer et al., ICCV 2021, "Generic attention-model explainability"): gradient-weighted rollout.

Per block, `Abar = mean_heads ReLU(A * dS/dA)` with A the attention probabilities; relevance
`R = prod_l (0.5 I + 0.5 Abar_l)` (in block order, R <- (0.5 I + 0.5 Abar) R); the map reads the rows the head
reads (`attention_readout`: the CLS row, the mean of the CLS and distillation rows for DeiT distilled, the mean
of the patch rows for average pooling), restricted to the patch columns. `0.5 (I + Abar)` is Chefer's
`I + Abar` update scaled by 1/2 per block, i.e. the same map times 0.5^L. Attention matrices are needed, so
fused attention is switched off inside the method only (restored after, even on errors). `libragrad` and `score` as in the gradient family: under LibraGrad,
dS/dA is taken through the rewired backward (A itself is a constant there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.gradient import GradientFamily
from caap.models.attention import attention_hooks, attention_modules, attention_readout
from caap.models.vit import ViTClassifier


class GenAtt(GradientFamily):
    name = "genatt"

    def setup(self, model: ViTClassifier) -> None:
        super().setup(model)
        attention_modules(model)  # no attention matrices (MLP-Mixer, other attention classes): a clear error
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

        def capture(_j: int, attention: Tensor) -> Tensor:
            # under LibraGrad A is built from detached q, k: give it a leaf so dS/dA still exists
            a = attention if attention.requires_grad else attention.detach().requires_grad_(True)
            maps.append(a)
            return a

        with self.rewired(model), attention_hooks(model, capture):
            logits = model.head(model.forward_blocks(r0))
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
