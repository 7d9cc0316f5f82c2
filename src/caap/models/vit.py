"""The ViT surface every attribution method relies on: embeddings, blocks by index, head, token layout.

`ViTClassifier` wraps a timm `VisionTransformer` (or subclass) and takes images in pixel space `[B, 3, H, W]`
with values in [0, 1]; the model's own normalisation (mean, std from timm's data config) happens inside, so
that neutral images, blurs and masks are all defined in pixel space. The residual stream is indexed as in
DESIGN.md: `r_0` = token embeddings (after patch embed, prefix tokens, position embedding, pre-norm), `r_j` =
output of block j-1, `r_L` = output of the last block; tokens are `num_prefix_tokens` prefix tokens (CLS,
registers, distillation) followed by the `gh * gw` patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


class ViTClassifier(nn.Module):
    """A timm ViT with pixel-space input and the residual-stream surface of DESIGN.md.

    Args:
        model: a timm `VisionTransformer` (or subclass such as DeiT's distilled model).
        mean, std: per-channel normalisation applied inside `forward` and `embed`.
        multilabel: whether the head was trained with independent sigmoids (FashionGrid) instead of a softmax;
            decides what `probabilities` means.
        name: the model's name, for messages.
        class_names: optional names of the output classes.
    """

    def __init__(
        self,
        model: VisionTransformer,
        mean: Sequence[float],
        std: Sequence[float],
        multilabel: bool = False,
        name: str = "vit",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise TypeError(
                f"model '{name}' is a {type(model).__name__}; caap supports timm VisionTransformer-family "
                f"models (ViT, DeiT, DeiT3, DINOv2, CLIP, with or without CLS / registers / avg pooling)"
            )
        if getattr(model, "attn_pool", None) is not None:
            raise TypeError(
                f"model '{name}' uses attention-pool heads ('map'); supported pools: token, avg, avgmax, max"
            )
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.multilabel = multilabel
        self.name = name
        self.class_names = list(class_names) if class_names is not None else None

    # -- token layout -----------------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Number of tokens before the patch tokens (CLS + registers + distillation token)."""
        return int(self.model.num_prefix_tokens)

    @property
    def blocks(self) -> nn.Sequential:
        """The transformer blocks, `blocks[j]` maps `r_j` to `r_{j+1}`."""
        return self.model.blocks

    @property
    def depth(self) -> int:
        """Number of blocks L; residual positions are 0..L."""
        return len(self.model.blocks)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        """Patch grid `(gh, gw)` for images of this spatial size."""
        h, w = images.shape[-2:]
        if getattr(self.model.patch_embed, "dynamic_img_size", False) or self.model.dynamic_img_size:
            return tuple(self.model.patch_embed.dynamic_feat_size((h, w)))
        expected = tuple(self.model.patch_embed.img_size)
        if (h, w) != expected:
            raise ValueError(
                f"model '{self.name}' expects {expected[0]}x{expected[1]} images, got {h}x{w}; "
                f"resize the data or build the model with dynamic_img_size=true"
            )
        return tuple(self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    # -- the residual stream --------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """Pixel space `[B, 3, H, W]` in [0, 1] to the model's input normalisation."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def embed(self, images: Tensor) -> Tensor:
        """`r_0` `[B, T, D]`: patch embed, prefix tokens, position embedding, pre-norm (as timm's forward_features)."""
        m = self.model
        x = m.patch_embed(self.normalize(images))
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def forward_blocks(
        self, x: Tensor, start: int = 0, stop: int | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Run blocks `start..stop-1` on `r_start` `[B, T, D]`, returning `r_stop`; `attn_mask` as timm blocks take it."""
        for block in self.model.blocks[start:stop]:
            x = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
        return x

    def head(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]` from `r_L` `[B, T, D]`: final norm, pooling, fc_norm and classifier."""
        return self.model.forward_head(self.model.norm(x))

    def forward(self, images: Tensor) -> Tensor:
        """Logits `[B, num_classes]` for pixel-space images `[B, 3, H, W]`."""
        return self.head(self.forward_blocks(self.embed(images)))

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: sigmoid for a multi-label head, softmax otherwise."""
        return logits.sigmoid() if self.multilabel else logits.softmax(-1)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """The patch tokens `[B, N, D]` of a residual `[B, T, D]`."""
        return x[:, self.num_prefix_tokens :]
