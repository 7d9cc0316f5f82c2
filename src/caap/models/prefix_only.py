"""The prefix-only last block: `r_L`'s prefix tokens computed without the patch tokens' queries.

When the head reads only prefix tokens of `r_L` (timm `global_pool='token'`, also DeiT's distilled head), the
patch tokens of the last block's output are never read, so the last block can be computed for the prefix
tokens' queries only (keys and values still come from every token). Exact; it saves most of the last block
in the patched runs of CAAP's engine, where the patch tokens are the bulk of each sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeGuard, cast

import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from caap.models.vit import ViTClassifier


def head_reads_prefix_only(model: ViTClassifier) -> bool:
    """Whether the classifier head reads only prefix tokens of `r_L` (timm `global_pool='token'`)."""
    vit = model.model
    return (
        type(vit) in (VisionTransformer, VisionTransformerDistilled)
        and vit.global_pool == "token"
        and model.pooling in ("token", "distilled")  # not DINOv2's CLS + mean patch head
        and getattr(vit, "attn_pool", None) is None
        and model.num_prefix_tokens >= (2 if isinstance(vit, VisionTransformerDistilled) else 1)
    )


def prefix_only_last_block(model: ViTClassifier) -> Callable[[Tensor], Tensor] | None:
    """The last block as `x [c, T, D] -> [c, P, D]` for the `P` prefix tokens only, or None when that is not
    exact for this model's head (`head_reads_prefix_only`) or its last block is not a plain timm `Block` in
    eval mode. Equals `model.blocks[-1](x)[:, :P]` up to float rounding."""
    if not head_reads_prefix_only(model):
        return None
    block = model.blocks[model.depth - 1]
    if not _supported(block):
        return None
    return partial(_prefix_only_block, block, num_prefix=model.num_prefix_tokens)


def _supported(block: nn.Module) -> TypeGuard[Block]:
    attn = getattr(block, "attn", None)
    return (
        type(block) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and not block.training
    )


def _prefix_only_block(block: Block, x: Tensor, num_prefix: int) -> Tensor:
    """timm `Block` on `x` `[c, T, D]`: queries, projection and MLP for the first `num_prefix` tokens only."""
    attn = cast(Attention, block.attn)  # `_supported` checked its type; timm declares `Block.attn` a Module
    c, t, _ = x.shape
    a, heads, hd = attn.attn_dim, attn.num_heads, attn.head_dim
    h = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :num_prefix], weight[:a], None if bias is None else bias[:a])
    kv = F.linear(h, weight[a:], None if bias is None else bias[a:])
    q = q.reshape(c, num_prefix, heads, hd).transpose(1, 2)
    k, v = kv.reshape(c, t, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = o.transpose(1, 2).reshape(c, num_prefix, a)
    o = attn.proj_drop(attn.proj(attn.norm(o)))
    y = x[:, :num_prefix] + block.drop_path1(block.ls1(o))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
