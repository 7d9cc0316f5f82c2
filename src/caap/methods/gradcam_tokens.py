"""GradCAM on tokens (the token form LibraGrad evaluates): at the input r_j of block `layer`, channel weights
`w_d = mean over patch tokens of dS/dr_j[:, d]`, map `sum_d r_j[i, d] w_d` for each patch token i, signed
(no ReLU, as in the official code). `layer` indexes blocks (negative from the end; default -1 = input of the
last block, which still gets gradient under CLS pooling). `libragrad` and `score` as in the gradient family.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.gradient import GradientFamily
from caap.models.vit import ViTClassifier


class GradCAMTokens(GradientFamily):
    name = "gradcam_tokens"

    def __init__(self, score: str | None = None, libragrad: bool | str = False, layer: int = -1) -> None:
        super().__init__(score=score, libragrad=libragrad)
        self.layer = int(layer)

    def setup(self, model: ViTClassifier) -> None:
        self.block_index(model)

    def block_index(self, model: ViTClassifier) -> int:
        depth = model.depth
        if not -depth <= self.layer < depth:
            raise ValueError(f"method.layer={self.layer} is out of range for a {depth}-block model")
        return self.layer % depth

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        j = self.block_index(model)
        with torch.no_grad():
            h = model.forward_blocks(model.embed(images), 0, j)
        h = h.detach().requires_grad_(True)
        with self.rewired(model):
            scores = self.target_scores(model, model.head(model.forward_blocks(h, j)), target)
            (grad,) = torch.autograd.grad(scores.sum(), h)
        patches, grad_patches = model.patch_tokens(h.detach()), model.patch_tokens(grad)
        weights = grad_patches.mean(1, keepdim=True)  # [B, 1, D]
        gh, gw = model.grid_size(images)
        return (patches * weights).sum(-1).float().reshape(-1, gh, gw)
