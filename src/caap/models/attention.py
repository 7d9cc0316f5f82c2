"""The attention matrices of a ViT / EVA: the fused-SDPA switch, hooks on the post-softmax attention, and
which rows of a `[T, T]` attention (or rollout) matrix stand for what the head reads.

timm computes attention either fused (SDPA, no matrix ever exists) or explicitly, where the post-softmax
matrix `[B, heads, T, T]` passes through `attn.attn_drop` (the identity in eval mode) before it multiplies V.
`attention_hooks` switches every attention to the explicit path and hooks `attn_drop` for the body only; the model's own flags and hooks are restored on exit,
also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from caap.models.vit import ViTClassifier

AttentionHook = Callable[[int, Tensor], Tensor | None]
"""`hook(block index, attention [B, heads, T, T])`; a returned tensor replaces the attention that multiplies V."""


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch every timm attention module of `model` between fused SDPA and the explicit softmax(QK^T)V."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", enabled)  # noqa: B010  (a plain attribute of timm's attention)


def attention_modules(model: ViTClassifier) -> list[nn.Module]:
    """Every block's attention module (timm `Attention` / `EvaAttention`), block 0 first.

    Raises a ValueError for models without attention (MLP-Mixer) and a TypeError for attention modules without
    timm's explicit path (`fused_attn` and an `attn_drop` module that receives the attention matrix).
    """
    if not model.has_attention:
        raise ValueError(
            f"model '{model.name}' ({model.family}) has no attention matrices; attention-based methods "
            f"(raw_attention, attention_rollout, genatt) need a ViT or EVA"
        )
    mods = []
    for j, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if (
            attn is None
            or not hasattr(attn, "fused_attn")
            or not isinstance(getattr(attn, "attn_drop", None), nn.Module)
        ):
            raise TypeError(
                f"model '{model.name}': block {j} has no timm Attention with `attn_drop` "
                f"({type(attn).__name__}); attention-based methods need timm's explicit softmax path"
            )
        mods.append(attn)
    return mods


def _attention_dropout(attn: nn.Module) -> nn.Module:
    """The module whose output is the attention that multiplies V (`attn_drop`, checked by `attention_modules`)."""
    drop = attn.attn_drop
    assert isinstance(drop, nn.Module)
    return drop


@contextmanager
def attention_hooks(model: ViTClassifier, hook: AttentionHook) -> Iterator[None]:
    """Call `hook(j, attention)` on block j's post-softmax attention `[B, heads, T, T]` (`attn_drop`'s output)
    in every forward of the body (fused attention off for the body only; flags and hooks restored on exit, also on errors)."""
    attns = attention_modules(model)
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    handles = []

    def block_hook(j: int) -> Callable[..., Tensor | None]:
        def forward_hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            return hook(j, output)

        return forward_hook

    try:
        set_fused_attn(model, False)
        for j, attn in enumerate(attns):
            handles.append(_attention_dropout(attn).register_forward_hook(block_hook(j)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            setattr(module, "fused_attn", flag)  # noqa: B010


@contextmanager
def capture_attention(model: ViTClassifier) -> Iterator[list[Tensor]]:
    """Collect the post-softmax attention `[B, heads, T, T]` of every block during forwards in the body.

    Yields a list that the forward passes inside fill, one detached entry per block call in call order (one
    forward through all blocks gives `depth` entries, block 0 first).
    """
    captured: list[Tensor] = []

    def keep(_j: int, attention: Tensor) -> None:
        captured.append(attention.detach())

    with attention_hooks(model, keep):
        yield captured


def readout_rows(model: ViTClassifier) -> str:
    """Which rows of a `[T, T]` attention / rollout matrix stand for what the head reads.

    Token pooling (CLS): the first prefix token's row ("cls"). DeiT's distilled head averages the logits of
    the CLS and distillation tokens (rows 0 and 1): the mean of those two rows ("cls+dist"). Patch pooling
    (avg / max / avgmax): the mean over the pooled tokens' rows ("mean"): the patch tokens, plus the prefix
    tokens when the model pools them (`pool_include_prefix`). DINOv2's CLS + mean patch head: the average of
    both ("cls+mean"). Models without attention (MLP-Mixer) fail clearly.
    """
    if not model.has_attention:
        raise ValueError(
            f"model '{model.name}' ({model.family}) has no attention matrices; attention-based methods "
            f"(raw_attention, attention_rollout, genatt) need a ViT or EVA"
        )
    pool = model.pooling
    if pool == "token":
        return "cls"
    if pool == "distilled":
        return "cls+dist"
    if pool == "token+avg":
        return "cls+mean"
    return "mean"


def attention_readout(model: ViTClassifier, matrix: Tensor) -> Tensor:
    """Patch-column scores `[B, N]` of `[B, T, T]`: the CLS row (token pooling), the mean of the CLS and
    distillation rows (DeiT distilled), the mean pooled-token row (patch pooling) or the average of CLS and
    mean patch rows (CLS + mean patch head), as `readout_rows` says."""
    kind = readout_rows(model)
    npre = model.num_prefix_tokens
    first = 0 if model.pool_include_prefix else npre
    if kind == "cls":
        row = matrix[:, 0]
    elif kind == "cls+dist":
        row = 0.5 * (matrix[:, 0] + matrix[:, 1])
    elif kind == "mean":
        row = matrix[:, first:].mean(1)
    else:
        row = 0.5 * (matrix[:, 0] + matrix[:, npre:].mean(1))
    return row[:, npre:]
