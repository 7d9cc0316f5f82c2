"""Activation memory of one token sequence in one block: the unit by which batched forwards are chunked."""

from __future__ import annotations

import torch
from torch import nn

from caap.models.vit import ViTClassifier

#: Activation memory of one sequence in one block, in units of T * D elements: residual stream, norm output,
#: q/k/v (3), attention output, projection, and the MLP hidden + activation (2 * mlp_ratio) -> 4 + 2 * 4.
#: Attention scores (heads * T * T) are added separately (twice without fused attention: scores, softmax).
_BASE_FACTOR = 4.0


def estimate_sequence_bytes(model: ViTClassifier, num_tokens: int, dtype: torch.dtype | None = None) -> int:
    """Estimated peak activation bytes of one sequence of `num_tokens` tokens in one block.

    `T * D * bytes * factor + heads * T * T * bytes * (1 if fused else 2)`, with `factor = 4 + 2 * mlp_ratio`
    (residual stream, norm output, q/k/v, attention output and projection, MLP hidden and activation;
    12 for the usual mlp_ratio 4) and the attention-score matrices (scores and softmax without fused
    attention). Under no_grad each block's intermediates are freed before the next, so this bounds a chunk.
    `dtype`: the compute dtype (default: the patch embedding's weight dtype).
    """
    vit = model.model
    d = int(vit.embed_dim)
    block = vit.blocks[0]
    attn = getattr(block, "attn", None)
    heads = int(getattr(attn, "num_heads", max(1, d // 64)))
    fused = bool(getattr(attn, "fused_attn", False))
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    mlp_ratio = fc1.out_features / d if isinstance(fc1, nn.Linear) else 4.0
    nbytes = torch.empty((), dtype=dtype or model.patch_embed.proj.weight.dtype).element_size()
    factor = _BASE_FACTOR + 2.0 * mlp_ratio
    t = int(num_tokens)
    return int(t * d * nbytes * factor + heads * t * t * nbytes * (1 if fused else 2))
