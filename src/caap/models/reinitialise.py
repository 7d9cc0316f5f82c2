"""Re-initialising a model's layers with timm's own ViT init, for model-randomisation sanity checks
(Adebayo et al., NeurIPS 2018): truncated normal std 0.02 for Linear weights, zero biases, `reset_parameters` /
`init_weights` for norms, LayerScale and the like.
"""

from __future__ import annotations

from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn


def reinitialise(module: nn.Module) -> None:
    """Re-initialise every parameter of `module` with timm's ViT init (in place; seed the RNG first)."""
    named_apply(init_weights_vit_timm, module, include_root=True)
