"""Shared pieces of the baseline methods: attention capture, score functions, validation, patch pooling.

`capture_attention(model)` is the one place that touches the model: it switches fused attention off, hooks the
attention dropout of every block (in timm's explicit path its input is the post-softmax attention matrix
`[B, heads, T, T]`), and always removes the hooks and restores every module's own `fused_attn` flag on exit,
even when the code inside raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caap.models.build import set_fused_attn
from caap.models.vit import ViTClassifier

SCORES = ("prob", "logit")
HEAD_FUSIONS = ("mean", "max", "min")


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` if it is one of `allowed`, else a ValueError naming `method.<key>`, the value and the choices."""
    if value not in allowed:
        raise ValueError(f"method.{key}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"method.{key}={value!r} must be an integer >= 1")
    return value


def check_probability(key: str, value: Any, open_interval: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value < 1.0 if open_interval else 0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if open_interval else "[0, 1)"
        raise ValueError(f"method.{key}={value!r} must be a number in {interval}")
    return float(value)


class ScoreModel(nn.Module):
    """Pixel images `[B, 3, H, W]` -> per-class scores `[B, C]` (probabilities or logits), for Captum."""

    def __init__(self, model: ViTClassifier, score: str) -> None:
        super().__init__()
        self.model = model
        self.score = check_choice("score", score, SCORES)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images).float()
        return self.model.probabilities(logits) if self.score == "prob" else logits


def target_score(model: ViTClassifier, logits: Tensor, target: Tensor, score: str) -> Tensor:
    """The target class's score `[B]` from logits `[B, C]`: its probability (`model.probabilities`) or logit."""
    picked = model.probabilities(logits) if score == "prob" else logits
    return picked.gather(1, target[:, None]).squeeze(1)


def pool_to_patches(pixel_map: Tensor, model: ViTClassifier, images: Tensor) -> Tensor:
    """Pixel maps `[B, H, W]` or `[B, C, H, W]` -> patch maps `[B, gh, gw]`: mean over each patch's pixels."""
    if pixel_map.ndim == 3:
        pixel_map = pixel_map[:, None]
    gh, gw = model.grid_size(images)
    ph, pw = model.patch_size
    x = pixel_map[..., : gh * ph, : gw * pw].float().mean(1, keepdim=True)
    return F.avg_pool2d(x, kernel_size=(ph, pw))[:, 0]


def patch_feature_mask(model: ViTClassifier, images: Tensor) -> Tensor:
    """`[1, 1, H, W]` long: the row-major patch index of every pixel (a Captum `feature_mask`).

    Pixels beyond the last full patch (images not divisible by the patch size) join the last patch row/column.
    """
    gh, gw = model.grid_size(images)
    ph, pw = model.patch_size
    h, w = images.shape[-2:]
    rows = (torch.arange(h, device=images.device) // ph).clamp_max(gh - 1)
    cols = (torch.arange(w, device=images.device) // pw).clamp_max(gw - 1)
    return (rows[:, None] * gw + cols[None, :])[None, None]


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global RNG seeded, restoring the RNG state afterwards (for Captum's sampling)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- attention matrices -------------------------------------------------------------------------------------
def _attention_modules(model: ViTClassifier) -> list[nn.Module]:
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


@contextmanager
def capture_attention(model: ViTClassifier) -> Iterator[list[Tensor]]:
    """Collect the post-softmax attention `[B, heads, T, T]` of every block during forwards in the body.

    Yields a list that the forward passes inside fill, one entry per block call in call order (one forward
    through all blocks gives `depth` entries, block 0 first). Fused attention is switched off for the body
    only; every module's own flag is restored and every hook removed on exit, also when the body raises.
    """
    attns = _attention_modules(model)
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    captured: list[Tensor] = []
    handles = []

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        captured.append(inputs[0].detach())

    try:
        set_fused_attn(model, False)
        for attn in attns:
            handles.append(attn.attn_drop.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.fused_attn = flag


def fuse_heads(attn: Tensor, head_fusion: str) -> Tensor:
    """`[B, heads, T, T]` -> `[B, T, T]` by mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(1)
    if head_fusion == "max":
        return attn.amax(1)
    if head_fusion == "min":
        return attn.amin(1)
    raise ValueError(f"method.head_fusion={head_fusion!r} is not supported; allowed: {list(HEAD_FUSIONS)}")


def readout_rows(model: ViTClassifier) -> str:
    """Which rows of a `[T, T]` attention/rollout matrix stand for what the head reads.

    Token pooling (CLS, also DeiT's distilled pair): the first prefix token's row ("cls"). Patch pooling
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
    if pool in ("token", "distilled"):
        return "cls"
    if pool == "token+avg":
        return "cls+mean"
    return "mean"


def attention_readout(model: ViTClassifier, matrix: Tensor) -> Tensor:
    """Patch-column scores `[B, N]` of `[B, T, T]`: the CLS row (token pooling), the mean pooled-token row
    (patch pooling) or the average of the two (CLS + mean patch head)."""
    kind = readout_rows(model)
    npre = model.num_prefix_tokens
    first = 0 if model.pool_include_prefix else npre
    if kind == "cls":
        row = matrix[:, 0]
    elif kind == "mean":
        row = matrix[:, first:].mean(1)
    else:
        row = 0.5 * (matrix[:, 0] + matrix[:, npre:].mean(1))
    return row[:, npre:]
