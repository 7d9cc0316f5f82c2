"""The token-model surface every attribution method relies on: embeddings, blocks by index, head, token layout.

`ViTClassifier` wraps a timm token model and takes images in pixel space `[B, 3, H, W]` with values in [0, 1];
the model's own normalisation (mean, std from timm's data config) happens inside, so that neutral images,
blurs and masks are all defined in pixel space. The residual stream is indexed from the embeddings: `r_0` = token
embeddings (after patch embed, prefix tokens, position embedding, pre-norm), `r_j` = output of block j-1,
`r_L` = output of the last block; tokens are `num_prefix_tokens` prefix tokens (CLS, registers, distillation)
followed by the `gh * gw` patch tokens.

Supported timm families (`family`):

- `vit`: `VisionTransformer` and subclasses (ViT AugReg, DeiT, DeiT distilled, DeiT3, DINOv2, CLIP);
- `eva`: `Eva` (EVA02: rotary position embeddings, SwiGLU MLP); every block gets the model's rope table;
- `mixer`: `MlpMixer` (no attention, no prefix tokens; token-mixing MLPs of fixed length, so no token masking).

The head is `classify(pool(norm(r_L), keep))`. `pooling` names what the head reads: `token` (the CLS token),
`distilled` (DeiT: CLS and distillation tokens through two heads, averaged), `avg` / `max` / `avgmax` (patch
tokens, plus the prefix tokens with `pool_include_prefix`), or `token+avg` (the CLS token concatenated with the
mean patch token, the DINOv2 linear classifiers' input; registers excluded). `pool(x, keep)` pools a sequence
in which only the patch tokens `keep` `[B, N]` are present, which is exactly pooling the shortened sequence.

Token removal (`caap.token_removal`) asks the model: `can_drop_tokens` (attention models; not MLP-Mixer),
`forward_kept` (the blocks on the prefix tokens and the kept patch tokens only), and `pool` defines the pooled
feature of an empty set (every pooled token removed) as the all-zero vector, the head's "no evidence" input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from timm.layers import PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from caap.scores import class_scores

POOLINGS = ("token", "distilled", "avg", "max", "avgmax", "token+avg")
PATCH_POOLS = ("avg", "max", "avgmax")
FAMILIES = {VisionTransformer: "vit", Eva: "eva", MlpMixer: "mixer"}


def model_family(model: nn.Module) -> str | None:
    """`vit`, `eva` or `mixer` for the supported timm classes (and their subclasses), else None."""
    for cls, family in FAMILIES.items():
        if isinstance(model, cls):
            return family
    return None


class RopeBlock(nn.Module):
    """An EVA block called as `block(x, attn_mask=None)` with the model's rotary table filled in.

    Keeps the `ViTClassifier.blocks[j](x)` contract of plain ViT blocks; `attn` is the wrapped block's
    attention module. Not registered as a submodule (the wrapped block belongs to the timm model).
    """

    # the wrapped timm EVA block and the rope table (kept out of the submodules, see __init__)
    block: nn.Module
    _rope: Callable[[], Tensor | None]

    def __init__(self, block: nn.Module, rope: Callable[[], Tensor | None]) -> None:
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: no duplicate parameters or state-dict keys
        self.__dict__["_rope"] = rope

    @property
    def attn(self) -> nn.Module:
        return cast(nn.Module, self.block.attn)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return self.block(x, rope=self._rope(), attn_mask=attn_mask)


class ViTClassifier(nn.Module):
    """A timm ViT / EVA / MLP-Mixer with pixel-space input and the residual-stream surface of the module docstring.

    Args:
        model: a timm `VisionTransformer` (or subclass such as DeiT's distilled model), `Eva` or `MlpMixer`.
        mean, std: per-channel normalisation applied inside `forward` and `embed`.
        multilabel: whether the head was trained with independent sigmoids (FashionGrid) instead of a softmax;
            decides what `probabilities` means.
        name: the model's name, for messages.
        class_names: optional names of the output classes.
        pooling: what the head reads (see the module docstring); None: the timm model's own pooling.
            `token+avg` needs `classifier`.
        classifier: a module `[B, F] -> [B, C]` replacing the timm head (applied after `fc_norm`): the DINOv2
            linear head on CLS + mean patch token, or a CLIP zero-shot head.
    """

    mean: Tensor  # [1, 3, 1, 1] normalisation buffers
    std: Tensor
    #: the wrapped timm `VisionTransformer` / `Eva` / `MlpMixer`. Typed `Any` on purpose: its attributes are read
    #: per `family` (`stem`, `rope`, `_pos_embed`, `head_dist`), which a type checker cannot narrow from a string
    model: Any
    #: timm's data config of the model (mean, std, crop_pct, interpolation), set by `build_model`; None otherwise
    data_config: dict[str, Any] | None = None

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        multilabel: bool = False,
        name: str = "vit",
        class_names: Sequence[str] | None = None,
        pooling: str | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        family = model_family(model)
        if family is None:
            raise TypeError(
                f"model '{name}' is a {type(model).__name__}; caap supports timm VisionTransformer-family "
                f"models (ViT, DeiT, DeiT3, DINOv2, CLIP, with or without CLS / registers / avg pooling), "
                f"Eva (EVA02) and MlpMixer"
            )
        if getattr(model, "attn_pool", None) is not None:
            raise TypeError(
                f"model '{name}' uses attention-pool heads ('map'); supported pools: {', '.join(POOLINGS)}"
            )
        if family == "eva" and (
            getattr(model, "dynamic_img_size", False) or getattr(model, "rope_mixed", False)
        ):
            raise TypeError(f"model '{name}': EVA with dynamic image size or mixed rope is not supported")
        self.model = model
        self.family = family
        self.name = name
        self.classifier = classifier
        self._pooling = pooling  # None: follow the timm model's global_pool (read on every use)
        _ = self.pooling  # validate now
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.multilabel = multilabel
        self.class_names = list(class_names) if class_names is not None else None
        if family == "eva":
            wrapped = [RopeBlock(b, self.rope_embed) for b in self.model.blocks]
            self.__dict__["_block_list"] = wrapped

    @property
    def pooling(self) -> str:
        """What the head reads (module docstring); raises a ValueError for a head that cannot be read."""
        m, pooling = self.model, self._pooling
        if pooling is None:
            pooling = "distilled" if isinstance(m, VisionTransformerDistilled) else (m.global_pool or "")
        if pooling not in POOLINGS:
            raise ValueError(
                f"model '{self.name}': pooling '{pooling}' is not supported; allowed: {list(POOLINGS)}"
            )
        if pooling in ("token", "distilled", "token+avg") and self.num_prefix_tokens < (
            2 if pooling == "distilled" else 1
        ):
            raise ValueError(f"model '{self.name}' pools a '{pooling}' but has no prefix token to read")
        if pooling == "distilled" and self.classifier is not None:
            raise ValueError("a custom classifier replaces DeiT's two distilled heads; use pooling='token'")
        if pooling == "token+avg" and self.classifier is None:
            raise ValueError("pooling 'token+avg' (CLS + mean patch token) needs a classifier of width 2 * D")
        return pooling

    # -- token layout -----------------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Number of tokens before the patch tokens (CLS + registers + distillation token)."""
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def patch_embed(self) -> PatchEmbed:
        """timm's `PatchEmbed` (`stem` of an MLP-Mixer)."""
        return cast(PatchEmbed, self.model.stem if self.family == "mixer" else self.model.patch_embed)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The blocks, `blocks[j](x, attn_mask=None)` maps `r_j` to `r_{j+1}` (EVA's rope filled in)."""
        if self.family == "eva":
            return self.__dict__["_block_list"]
        return self.model.blocks

    @property
    def depth(self) -> int:
        """Number of blocks L; residual positions are 0..L."""
        return len(self.model.blocks)

    @property
    def num_classes(self) -> int:
        if self.classifier is not None:
            out = getattr(self.classifier, "out_features", None) or self.classifier.num_classes
            return int(cast(int, out))  # nn.Linear's out_features, or the ZeroShotHead's num_classes
        return int(self.model.num_classes)

    @property
    def has_attention(self) -> bool:
        """Whether the blocks mix tokens by attention (ViT, EVA) rather than fixed MLPs (Mixer)."""
        return self.family != "mixer"

    @property
    def pool_include_prefix(self) -> bool:
        """Whether patch pooling also averages the prefix tokens (timm `pool_include_prefix`)."""
        return bool(getattr(self.model, "pool_include_prefix", False))

    @property
    def can_drop_tokens(self) -> bool:
        """Whether patch tokens may leave the sequence (taken out, or hidden from every query by an attention key
        mask) with the head pooling what is left: True for attention models, False for MLP-Mixer (token-mixing
        MLPs of a fixed length). A subclass whose head reads the full token grid sets it to False."""
        return self.has_attention

    def check_token_removal(self, what: str = "token removal", hint: str = "") -> None:
        """Raise a ValueError saying why `what` (removing patch tokens from the sequence) is undefined on this
        model, followed by `hint` (e.g. the alternative to use); nothing when `can_drop_tokens`."""
        _ = self.pooling  # a head that cannot be read fails here
        if self.can_drop_tokens:
            return
        reason = (
            "its token-mixing MLPs have a fixed sequence length"
            if not self.has_attention
            else "its head needs the full token grid"
        )
        raise ValueError(
            f"{what} is not supported on model '{self.name}' ({self.family}): {reason}, so tokens cannot be "
            f"removed from the sequence{hint}"
        )

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        """Patch grid `(gh, gw)` for images of this spatial size."""
        h, w = images.shape[-2:]
        pe = self.patch_embed
        if getattr(pe, "dynamic_img_size", False) or getattr(self.model, "dynamic_img_size", False):
            return _int_pair(pe.dynamic_feat_size((h, w)))
        expected = _int_pair(pe.img_size)
        if (h, w) != expected:
            raise ValueError(
                f"model '{self.name}' expects {expected[0]}x{expected[1]} images, got {h}x{w}; "
                f"resize the data or build the model with dynamic_img_size=true"
            )
        return _int_pair(pe.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _int_pair(self.patch_embed.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """The input size `(H, W)` the model was built for."""
        return _int_pair(self.patch_embed.img_size)

    # -- the residual stream --------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """Pixel space `[B, 3, H, W]` in [0, 1] to the model's input normalisation."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def rope_embed(self) -> Tensor | None:
        """EVA's rotary table for the model's grid (None for other families or without rope)."""
        rope = getattr(self.model, "rope", None)
        if rope is None:
            return None
        if hasattr(rope, "feat_shape"):
            return rope.get_embed()
        return rope.get_embed(shape=self.model.patch_embed.grid_size)

    def embed(self, images: Tensor) -> Tensor:
        """`r_0` `[B, T, D]`: patch embed, prefix tokens, position embedding, pre-norm (as timm's forward_features)."""
        m = self.model
        x = self.patch_embed(self.normalize(images))
        if self.family == "mixer":
            return x
        if self.family == "eva":
            x, _ = m._pos_embed(x)
            return m.norm_pre(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def forward_blocks(
        self, x: Tensor, start: int = 0, stop: int | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Run blocks `start..stop-1` on `r_start` `[B, T, D]`, returning `r_stop`; `attn_mask` as timm blocks take it.

        A sequence without any token (`T = 0`: every token removed) passes through unchanged."""
        if attn_mask is not None:
            self.check_token_removal("an attention mask")
        if x.shape[1] == 0:
            return x
        for block in list(self.blocks)[start:stop]:
            x = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
        return x

    def forward_kept(self, r0: Tensor, kept: Tensor, rows: Tensor | None = None) -> Tensor:
        """`r_L` `[B, npre + k, D]` of the sequence that holds only the prefix tokens and the patch tokens `kept`
        `[B, k]` (ascending patch indices, the same k for every row; k may be 0) of `r0[rows]` (`r_0` `[P, T, D]`,
        `rows` `[B]`, default all rows): the other patch tokens are taken out of the sequence.

        Every token keeps its own position: ViT's position embedding is in `r_0`; EVA's rotary table is gathered
        at the kept positions (as timm's patch dropout does)."""
        self.check_token_removal("dropping tokens")
        b, npre = kept.shape[0], self.num_prefix_tokens
        rows = torch.arange(b, device=r0.device) if rows is None else rows
        prefix = torch.arange(npre, device=r0.device).expand(b, npre)
        x = r0[rows[:, None], torch.cat([prefix, kept + npre], dim=1)]  # [B, npre + k, D]
        rope = self.rope_embed()
        if rope is None or x.shape[1] == 0:
            return self.forward_blocks(x)
        rope = rope.to(x.device)[kept][:, None]  # [B, 1, k, dim]: per-row tables, as timm's patch dropout
        for block in self.model.blocks:
            x = block(x, rope=rope)
        return x

    def final_norm(self, x: Tensor) -> Tensor:
        """The final norm of `r_L` `[B, T, D]` (Identity in models that norm after pooling, `fc_norm`)."""
        return self.model.norm(x)

    def pool(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Pooled features from normed tokens `x` `[B, T, D]`; with `keep` `[B, N]` (bool, patch tokens) only the
        kept patch tokens are pooled, as if the others had been removed from the sequence.

        Returns `[B, D]` (`[B, 2, D]` for `distilled`, `[B, 2D]` for `token+avg`). An empty kept set pools to
        the all-zero feature. Prefix-token pools (`token`, `distilled`) ignore `keep`.
        """
        pool, npre = self.pooling, self.num_prefix_tokens
        if pool == "token":
            return x[:, 0]
        if pool == "distilled":
            return x[:, :2]
        w = None if keep is None else keep.to(x.dtype)
        if pool == "token+avg":
            patches = x[:, npre:]
            mean = _mean_or_zero(patches) if w is None else _masked_mean(patches, w)
            return torch.cat([x[:, 0], mean], dim=-1)
        if self.pool_include_prefix:
            if w is not None:
                w = torch.cat([w.new_ones(w.shape[0], npre), w], dim=1)
        else:
            x = x[:, npre:]
        if w is None and x.shape[1] == 0:  # every pooled token removed: the empty set's all-zero feature
            w = x.new_zeros(x.shape[0], 0)
        if w is None:
            avg = x.mean(1)
            mx = x.amax(1) if pool != "avg" else None
        else:
            avg = _masked_mean(x, w)
            mx = None
            if pool != "avg":
                count = w.sum(1)[:, None]
                mx = x.masked_fill(w[:, :, None] == 0, float("-inf")).amax(1) if x.shape[1] else avg
                mx = torch.where(count > 0, mx, torch.zeros_like(mx))
        if pool == "avg":
            return avg
        assert mx is not None  # every pool but `avg` computed its max above
        return mx if pool == "max" else 0.5 * (mx + avg)

    def classify(self, features: Tensor) -> Tensor:
        """Logits `[B, C]` from pooled features (`pool`'s output): fc_norm, dropout, classifier."""
        m = self.model
        if self.pooling == "distilled":
            a, b = m.head_drop(features[:, 0]), m.head_drop(features[:, 1])
            return (m.head(a) + m.head_dist(b)) / 2
        fc_norm = getattr(m, "fc_norm", None)
        x = m.head_drop(features if fc_norm is None else fc_norm(features))
        return self.classifier(x) if self.classifier is not None else m.head(x)

    def head(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits `[B, C]` from `r_L` `[B, T, D]`: final norm, pooling (of the kept patch tokens `keep` `[B, N]`
        only, when given), fc_norm and classifier."""
        return self.classify(self.pool(self.final_norm(x), keep))

    def forward(self, images: Tensor) -> Tensor:
        """Logits `[B, num_classes]` for pixel-space images `[B, 3, H, W]`."""
        return self.head(self.forward_blocks(self.embed(images)))

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities `[B, C]`: sigmoid for a multi-label head, softmax otherwise (`caap.scores`)."""
        return class_scores(logits, "prob", self.multilabel)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """The patch tokens `[B, N, D]` of a residual `[B, T, D]`."""
        return x[:, self.num_prefix_tokens :]

    # -- the modules, for methods that hook or re-initialise them ---------------------------------------
    def modules_after_embedding(self) -> list[nn.Module]:
        """The parts of the network after `r_0`: the blocks, the final norm, fc_norm, timm's head and the
        replacing classifier (those that exist); what gradient rules and bias terms range over."""
        m = self.model
        parts = [m.blocks] + [getattr(m, n) for n in ("norm", "fc_norm", "head") if hasattr(m, n)]
        if isinstance(self.classifier, nn.Module):
            parts.append(self.classifier)
        return parts

    def head_modules(self) -> list[nn.Module]:
        """The head after the last block: final norm, fc_norm and timm's classifier (those that exist)."""
        m = self.model
        return [mod for mod in (m.norm, getattr(m, "fc_norm", None), m.head) if isinstance(mod, nn.Module)]

    def token_mixing_modules(self) -> set[nn.Module]:
        """The layers of MLP-Mixer token-mixing MLPs (`mlp_tokens`, acting on `[B, D, tokens]`); empty for
        attention models."""
        mixers = [getattr(block, "mlp_tokens", None) for block in self.model.blocks]
        return {m for mlp in mixers if isinstance(mlp, nn.Module) for m in mlp.modules()}


def _int_pair(value: Sequence[int]) -> tuple[int, int]:
    """`(a, b)` from timm's two-element size sequences (tuples, or lists after a config round trip)."""
    a, b = value
    return int(a), int(b)


def _mean_or_zero(x: Tensor) -> Tensor:
    """Mean of `x` `[B, T, D]` over its tokens; the all-zero feature when `T = 0`."""
    return x.mean(1) if x.shape[1] else x.new_zeros(x.shape[0], x.shape[2])


def _masked_mean(x: Tensor, w: Tensor) -> Tensor:
    """Mean of `x` `[B, T, D]` over the tokens with weight `w` `[B, T]` = 1 (zero where none is kept)."""
    count = w.sum(1, keepdim=True).clamp_min(1.0)
    return (x * w[:, :, None]).sum(1) / count
