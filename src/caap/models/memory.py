"""Activation memory of one token sequence in one block: the unit by which batched forwards are chunked."""

from __future__ import annotations

import torch
from torch import nn

from caap.models.vit import ViTClassifier

#: Activation memory of one sequence in one block, in units of T * D elements: residual stream, norm output,
#: q/k/v (3), attention output, projection, and the MLP hidden + activation (2 * mlp_ratio) -> 4 + 2 * 4.
#: Attention scores (heads * T * T) are added separately (twice without fused attention: scores, softmax).
_BASE_FACTOR = 4.0
#: Of those units, the ones in the residual stream's dtype: the stream itself and the norm output.
_STREAM_UNITS = 2.0


def stream_dtype(model: ViTClassifier, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the residual stream and of the LayerNorm outputs when blocks compute in `dtype`.

    Under autocast the matrix products run in `dtype` (e.g. bfloat16) but the residual additions promote to the
    parameters' dtype (float32 weights: a float32 stream) and autocast keeps LayerNorm in float32 on CUDA; a
    model held in bfloat16 has a bfloat16 stream.
    """
    weight = model.patch_embed.proj.weight.dtype
    return torch.promote_types(weight, dtype or weight)


def estimate_sequence_bytes(model: ViTClassifier, num_tokens: int, dtype: torch.dtype | None = None) -> int:
    """Estimated peak activation bytes of one sequence of `num_tokens` tokens in one block.

    `T * D * (2 * stream bytes + (factor - 2) * bytes) + heads * T * T * bytes * (1 if fused else 2)`, with
    `factor = 4 + 2 * mlp_ratio` units of `T * D` (residual stream, norm output, q/k/v, attention output and
    projection, MLP hidden and activation; 12 for the usual mlp_ratio 4) and the attention-score matrices
    (scores and softmax without fused attention). `bytes` is the compute dtype's size, `stream bytes` that of
    the residual stream and norm outputs (`stream_dtype`: float32 under bf16 autocast of a float32 model,
    which then also makes a compute-dtype copy of each norm output for the next matrix product: one more unit).
    Under no_grad each block's intermediates are freed before the next, so this bounds a chunk.
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
    compute = dtype or model.patch_embed.proj.weight.dtype
    stream = stream_dtype(model, compute)
    nbytes = _element_size(compute)
    stream_bytes = _element_size(stream)
    low_units = _BASE_FACTOR + 2.0 * mlp_ratio - _STREAM_UNITS + (1.0 if stream != compute else 0.0)
    t = int(num_tokens)
    per_token = _STREAM_UNITS * stream_bytes + low_units * nbytes
    return int(t * d * per_token + heads * t * t * nbytes * (1 if fused else 2))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
