"""Raw attention of one block: the attention that what the head reads pays to each patch token.

For CLS-pooled models the CLS row of block `block`'s attention (fused over heads: mean, max or min) at the
patch columns; for patch-pooling models (no CLS) the mean over the pooled tokens' rows (see
`attention_rollout`). Fused attention is switched off inside the method only. Batched over images.
"""

from __future__ import annotations

from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.head_fusion import HEAD_FUSIONS, fuse_heads
from caap.methods.option_checks import check_choice
from caap.models.attention import attention_readout, capture_attention, readout_rows
from caap.models.vit import ViTClassifier


class RawAttention(AttributionMethod):
    """Head-fused attention of block `block` (negative: from the end; -1 = the last block), `[B, gh, gw]`."""

    requires_grad = False
    name = "raw_attention"

    def __init__(self, block: int = -1, head_fusion: str = "mean") -> None:
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"method.block={block!r} must be an integer block index")
        self.block = block
        self.head_fusion = check_choice("head_fusion", head_fusion, HEAD_FUSIONS)

    def _block_index(self, model: ViTClassifier) -> int:
        depth = model.depth
        if not -depth <= self.block < depth:
            raise ValueError(
                f"method.block={self.block} is out of range for model '{model.name}' with {depth} blocks; "
                f"allowed: {-depth}..{depth - 1}"
            )
        return self.block % depth

    def setup(self, model: ViTClassifier) -> None:
        self._block_index(model)
        readout_rows(model)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        j = self._block_index(model)
        readout_rows(model)
        x = model.embed(images)
        with capture_attention(model) as attentions:
            model.forward_blocks(x, stop=j + 1)  # later blocks do not change block j's attention
        matrix = fuse_heads(attentions[j].float(), self.head_fusion)
        gh, gw = model.grid_size(images)
        return attention_readout(model, matrix).reshape(-1, gh, gw)
