"""The token-removal engine: logits of a token model after every patch token outside a kept set is removed.

One engine for everything that removes patch tokens: LibraGrad's MIF / LIF / SRG (`caap.metrics.faithfulness`,
and through them `layers=auto`) and token sampling (`caap.methods.token_sampling`). It lives below `methods/`
and `metrics/` so that both use it. Prefix tokens (CLS, registers, distillation) are always kept. Removal modes:

- `drop` (LibraGrad): removed tokens leave the sequence (`ViTClassifier.forward_kept`, every token keeps its
  position) and the head pools what is left; rows keeping the same number of tokens run as one batch.
- `mask`: removed tokens stay in the sequence, hidden from every query by an attention key mask, and the head
  pools the kept tokens only. The same logits as `drop` up to float rounding (a masked key has softmax weight
  exactly 0, per-token operations do not mix tokens); every row has the full length, so any rows share a batch.
- `replace`: removed tokens are replaced by a baseline's tokens at the same positions (the `r_0` of a neutral
  image, or zeros); the sequence keeps its length, so this also runs on models that cannot lose tokens.

When every pooled token is removed, the head pools the empty set to the all-zero feature (`ViTClassifier.pool`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from caap.models.vit import ViTClassifier

Removal = Literal["drop", "mask", "replace"]
REMOVALS: tuple[Removal, ...] = ("drop", "mask", "replace")


def patch_ranking(maps: Tensor) -> Tensor:
    """Patch indices `[P, N]` from most to least attributed for maps `[P, gh, gw]` (or `[P, N]`).

    Stable descending sort of the signed map: ties are ranked by row-major patch position, so a constant map
    ranks patches in reading order (LibraGrad ranks by signed score; the tie rule is ours, for reproducibility).
    """
    flat = maps.reshape(maps.shape[0], -1)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def patch_ranks(maps: Tensor) -> Tensor:
    """Rank `[P, N]` of every patch under `patch_ranking` (0 = most attributed) for maps `[P, gh, gw]`."""
    order = patch_ranking(maps)
    p, n = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(p, n))
    return rank


def check_removal(model: ViTClassifier, removal: str, what: str = "token removal", hint: str = "") -> None:
    """Raise a clear ValueError when `removal` is unknown or when this model cannot lose tokens (`drop` and
    `mask` need `model.can_drop_tokens`); `hint` is appended to the latter message."""
    if removal not in REMOVALS:
        raise ValueError(f"removal='{removal}' is not supported; allowed: {list(REMOVALS)}")
    if removal == "replace":
        _ = model.pooling  # a head that cannot be read fails here
    else:
        model.check_token_removal(what, hint)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, total)) for s in range(0, total, size)]


@torch.no_grad()
def removal_logits(
    model: ViTClassifier,
    r0: Tensor,
    keep: Tensor,
    rows: Tensor | None = None,
    removal: Removal = "drop",
    baseline: Tensor | None = None,
    max_batch: int = 4096,
) -> Tensor:
    """Logits `[R, C]` of R sequences, each `r0[rows[i]]` with only the patch tokens `keep[i]` kept.

    Args:
        model: the classifier; nothing is changed on it.
        r0: `[P, T, D]` token embeddings (`model.embed(images)`).
        keep: `[R, N]` bool, which patch tokens each sequence keeps.
        rows: `[R]` long, which `r0` row each sequence starts from; default `arange(P)` (then R = P).
        removal: 'drop', 'mask' or 'replace' (module docstring).
        baseline: for 'replace': `[P, T, D]` tokens that replace the removed ones (row-aligned with `r0`).
        max_batch: most sequences per forward pass.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    check_removal(model, removal)
    r, npre = keep.shape[0], model.num_prefix_tokens
    rows = torch.arange(r, device=r0.device) if rows is None else rows.to(r0.device)
    keep = keep.to(r0.device, torch.bool)
    if r == 0:
        return r0.new_empty(0, model.num_classes)
    if removal == "drop":
        return _drop_logits(model, r0, keep, rows, max_batch)
    if removal == "replace" and baseline is None:
        raise ValueError("removal='replace' needs the baseline tokens that replace the removed ones")
    logits = []
    for sl in _chunks(r, max_batch):
        kp, rp = keep[sl], rows[sl]
        if removal == "mask":
            visible = torch.cat([kp.new_ones(kp.shape[0], npre), kp], dim=1)  # [B, T]
            # a sequence with no visible token at all (no prefix, nothing kept) would give NaN attention rows:
            # let it see everything; the head pools it to the all-zero feature all the same.
            visible = visible | ~visible.any(1, keepdim=True)
            seq = r0[rp].contiguous()  # r_0 of a patch-only model is a transposed view: fix one layout
            x = model.forward_blocks(seq, attn_mask=visible[:, None, None, :])
            logits.append(model.head(x, kp))
        else:
            seq = r0[rp].clone()
            seq[:, npre:] = torch.where(kp[..., None], seq[:, npre:], baseline[rp, npre:])  # type: ignore[index]
            logits.append(model.head(model.forward_blocks(seq)))
    return torch.cat(logits)


def _drop_logits(model: ViTClassifier, r0: Tensor, keep: Tensor, rows: Tensor, max_batch: int) -> Tensor:
    """`removal_logits` for 'drop': rows grouped by their number of kept tokens (in order of first appearance,
    rows in order within a group), each group in chunks of `max_batch`."""
    counts = keep.sum(1)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(counts.tolist()):
        groups.setdefault(int(c), []).append(i)
    out: Tensor | None = None
    for kept, members in groups.items():
        sel = torch.tensor(members, device=keep.device)
        idx = keep[sel].nonzero()[:, 1].reshape(len(members), kept)  # [G, kept], ascending per row
        parts = [
            model.head(model.forward_kept(r0, idx[sl], rows[sel[sl]]))
            for sl in _chunks(len(members), max_batch)
        ]
        logits = torch.cat(parts)
        if out is None:
            out = logits.new_empty(keep.shape[0], logits.shape[1])
        out[sel] = logits
    assert out is not None  # at least one row
    return out
