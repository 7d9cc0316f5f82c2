"""Fusing the heads of an attention matrix, for the attention-reading methods (raw attention, rollout)."""

from __future__ import annotations

from torch import Tensor

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: Tensor, head_fusion: str) -> Tensor:
    """`[B, heads, T, T]` -> `[B, T, T]` by mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(1)
    if head_fusion == "max":
        return attn.amax(1)
    if head_fusion == "min":
        return attn.amin(1)
    raise ValueError(f"method.head_fusion={head_fusion!r} is not supported; allowed: {list(HEAD_FUSIONS)}")
