"""Attention rollout (Abnar and Zuidema, ACL 2020), with the residual and head-fusion options of common use.

Per block l the attention `[heads, T, T]` is fused over heads (mean, max or min); optionally the lowest
`discard_ratio` fraction of the fused matrix's entries (per image, over the whole matrix) is set to zero,
never the columns of prefix tokens (as in the widely used vit-explain implementation, which spares the CLS
token); the residual connection is modelled as `0.5 I + 0.5 A` and each row is renormalised to sum to 1.
The rollout is the product `A_L ... A_1`. The map is the row of what the head reads, at the patch columns:
- CLS-pooled models (with or without registers): the CLS row;
- models pooling patch tokens (avg / max / avgmax, no CLS): the mean over the pooled tokens' rows (the patch
  tokens, plus the prefix tokens when `pool_include_prefix`), i.e. the rollout of the pooled feature when the
  pool is an average (for max pooling this is an approximation, documented as such).

The attention matrices are captured with fused attention switched off inside the method only
(`caap.models.attention.capture_attention`, which always restores the model). Batched over images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.head_fusion import HEAD_FUSIONS, fuse_heads
from caap.methods.option_checks import check_choice, check_probability
from caap.models.attention import attention_readout, capture_attention, readout_rows
from caap.models.vit import ViTClassifier


def rollout(
    attentions: list[Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """`A_L ... A_1` `[B, T, T]` from per-block attentions `[B, heads, T, T]` (block 0 first)."""
    result = None
    for attn in attentions:
        a = fuse_heads(attn.float(), head_fusion)
        b, t, _ = a.shape
        if discard_ratio > 0:
            flat = a.reshape(b, -1)
            k = int(flat.shape[1] * discard_ratio)
            drop = torch.zeros_like(flat, dtype=torch.bool)
            drop.scatter_(1, flat.topk(k, dim=1, largest=False).indices, True)
            drop = drop.reshape(b, t, t)
            drop[:, :, :num_prefix_tokens] = False
            a = a.masked_fill(drop, 0.0)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(t, device=a.device, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("attention rollout needs at least one block")
    return result


class AttentionRollout(AttributionMethod):
    """Attention rollout maps `[B, gh, gw]` (Abnar and Zuidema 2020)."""

    requires_grad = False
    name = "attention_rollout"

    def __init__(self, head_fusion: str = "mean", discard_ratio: float = 0.0, residual: bool = True) -> None:
        self.head_fusion = check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
        self.discard_ratio = check_probability("discard_ratio", discard_ratio, open_interval=False)
        if not isinstance(residual, bool):
            raise ValueError(f"method.residual={residual!r} must be true or false")
        self.residual = residual

    def setup(self, model: ViTClassifier) -> None:
        readout_rows(model)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        readout_rows(model)
        with capture_attention(model) as attentions:
            model.forward_blocks(model.embed(images))
        matrix = rollout(
            attentions[: model.depth],
            self.head_fusion,
            self.discard_ratio,
            self.residual,
            model.num_prefix_tokens,
        )
        gh, gw = model.grid_size(images)
        return attention_readout(model, matrix).reshape(-1, gh, gw)
