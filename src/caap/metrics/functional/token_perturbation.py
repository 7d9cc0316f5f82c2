"""Patch-token deletion and insertion curves in the LibraGrad protocol, batched over all fractions.

LibraGrad (Mehri, Soleymani Baghshah and Pilehvar, CVPR 2025; arXiv 2411.16760) evaluates faithfulness by
*removing patch tokens from the sequence* (the prefix tokens, CLS and registers, are always kept) in the order of the attribution map, and reports the area
under the curve of the target score over the removed / kept fraction:

- deletion (MIF, "most influential first"): at fraction f the `round(f * N)` most-attributed patches are
  removed; fraction 0 is the unperturbed image. Lower AUC is better.
- insertion (LIF, "least influential first" removed): at fraction f only the `round(f * N)` most-attributed
  patches are kept, i.e. the curve starts from no patch at all and adds patches in map order; fraction 1 is
  the unperturbed image. Higher AUC is better.

Removing a token from the sequence is computed here without shortening it: every removed token is hidden
from every query by a boolean key mask in all attention layers. The kept tokens then see exactly the
sequence they would see after physical removal (a masked key gets softmax weight exactly 0), and per-token
operations (LayerNorm, MLP) do not mix tokens, so for token-pooled (CLS) models the result equals physical
removal. For models that pool patch tokens (`global_pool` in avg / max / avgmax) the pooling is restricted
to the kept tokens as well (`masked_head`). This lets all K fractions of all P images run as one batch
`[P*K, T, D]` from a single `r_0 = model.embed(images)`.

Ranking: patches are sorted by signed attribution, descending, with a *stable* sort, so ties are broken by
position (lower row-major patch index ranks first); deletion removes a prefix of this ranking and insertion
keeps a prefix of it, so a constant map deletes / inserts patches in reading order. The number of patches at
fraction f is `round(f * N)` (Python rounding, robust to float noise such as `0.7 * 10`).

Empty pool: when a fraction removes every patch, only the prefix tokens remain. A patch-pooling model whose
pool has no prefix token in it (none at all, or registers excluded by `pool_include_prefix=False`, as in
DINOv2-style avg pooling) then has nothing to pool, where timm would return a NaN mean. This module defines
the pooled feature of an empty set as the all-zero vector (before `fc_norm`), so the score is
`head(fc_norm(0))`, the model's output for "no evidence at all". Attention rows with no visible key are avoided (they would give NaN) by letting such
sequences attend to everything; their pooled feature ignores those tokens, so the value stays as defined.

A map with a non-finite entry has no defined ranking: its whole curve is NaN (skipped, with a warning, by
`AttributionMetric.compute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from caap.models.vit import ViTClassifier
from caap.scores import PROB_OR_LOGIT, Score, check_score, target_score

Mode = Literal["deletion", "insertion"]

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""0.0, 0.1, ..., 1.0: both endpoints included, as the AUC "including the unmasked endpoint" needs."""


def check_fractions(fractions: Sequence[float] | Tensor | None) -> Tensor:
    """Validate `fractions` (strictly increasing, within [0, 1]); None gives `DEFAULT_FRACTIONS`. Returns `[K]` float64."""
    if fractions is None:
        fractions = DEFAULT_FRACTIONS
    if not isinstance(fractions, Tensor):
        fractions = [float(x) for x in fractions]  # also an OmegaConf ListConfig from Hydra
    f = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if f.numel() == 0:
        raise ValueError("fractions is empty; give at least one fraction in [0, 1]")
    if not bool(((f >= 0) & (f <= 1)).all()):
        raise ValueError(f"fractions must lie in [0, 1], got {f.tolist()}")
    if f.numel() > 1 and not bool((f[1:] > f[:-1]).all()):
        raise ValueError(f"fractions must be strictly increasing, got {f.tolist()}")
    return f


def patch_ranking(maps: Tensor) -> Tensor:
    """Patch indices `[P, N]` from most to least attributed for maps `[P, gh, gw]` (or `[P, N]`).

    Stable descending sort of the signed map: ties are ranked by row-major patch position (LibraGrad's
    protocol ranks by signed score; the tie rule is ours, fixed so that runs are reproducible).
    """
    flat = maps.reshape(maps.shape[0], -1)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def keep_masks(
    maps: Tensor, fractions: Sequence[float] | Tensor | None = None, mode: Mode = "deletion"
) -> Tensor:
    """Which patch tokens are kept, `[P, K, N]` bool, for maps `[P, gh, gw]` and K fractions.

    deletion: the `round(f * N)` most-attributed patches are removed at fraction f (LibraGrad MIF);
    insertion: only the `round(f * N)` most-attributed patches are kept (LIF, from no patch to all patches).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got '{mode}'")
    f = check_fractions(fractions)
    p = maps.shape[0]
    n = maps[0].numel() if p else int(torch.tensor(maps.shape[1:]).prod())
    counts = torch.tensor([round(float(x) * n) for x in f], device=maps.device)  # [K]
    order = patch_ranking(maps)  # [P, N]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=maps.device).expand(p, n))  # rank[p, i] = rank of patch i
    top = rank[:, None, :] < counts[None, :, None]  # [P, K, N]: patch within the first count ranks
    return ~top if mode == "deletion" else top


def masked_head(model: ViTClassifier, x: Tensor, keep: Tensor) -> Tensor:
    """Logits `[B, C]` from `r_L` `[B, T, D]` with only the kept patch tokens `keep` `[B, N]` (bool) pooled.

    Delegates to `ViTClassifier.head(x, keep)`: token pooling (CLS, DeiT's distilled pair) is unaffected by
    removed tokens; patch pooling (avg / max / avgmax, and the mean half of DINOv2's CLS + mean head) pools
    over the kept tokens only, exactly as on the shortened sequence; an empty set pools to the all-zero
    feature (see the module docstring). Then fc_norm, head_drop, classifier.
    """
    return model.head(x, keep)


def _check_model(model: ViTClassifier) -> None:
    model.check_token_removal("token removal (deletion / insertion)")


@torch.no_grad()
def token_perturbation_curves(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    fractions: Sequence[float] | Tensor | None = None,
    mode: Mode = "deletion",
    score: Score = "prob",
    max_batch: int = 4096,
) -> Tensor:
    """Deletion or insertion curves `[P, K]` of the target score, LibraGrad token-removal protocol.

    Args:
        model: the classifier (eval mode is the caller's business; nothing is changed on it).
        images: `[P, 3, H, W]` pixel space in [0, 1].
        maps: `[P, gh, gw]` patch-grid attributions (signed; ranked descending, ties by position).
        classes: `[P]` target class per map.
        fractions: K strictly increasing fractions in [0, 1]; default 0.0, 0.1, ..., 1.0.
        mode: 'deletion' (most-attributed removed first, MIF) or 'insertion' (only the most-attributed
            fraction kept, LIF).
        score: 'prob' (sigmoid for multi-label heads, softmax otherwise) or 'logit' (`caap.scores`).
        max_batch: most sequences per forward pass; the P*K perturbed sequences run in chunks of this size.

    Returns:
        `[P, K]` float32 scores on the model's device: entry (p, k) is the target score with the patches of
        `keep_masks(...)[p, k]` kept. All-NaN rows for maps with a non-finite entry.

    One `r_0 = model.embed(images)` is computed, then all (image, fraction) pairs go through the blocks as
    one batch with a key mask `[B, 1, 1, T]` hiding removed tokens from every query (see the module docstring
    for why this equals physical removal).
    """
    check_score(score, PROB_OR_LOGIT)
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    _check_model(model)
    device = next(model.parameters()).device
    images, maps, classes = images.to(device), maps.to(device), classes.to(device).long()
    gh, gw = model.grid_size(images)
    if tuple(maps.shape[1:]) != (gh, gw):
        raise ValueError(f"maps have shape {tuple(maps.shape)}, expected [P, {gh}, {gw}] for these images")
    f = check_fractions(fractions)
    p, k, n = maps.shape[0], f.numel(), gh * gw
    if p == 0:
        return torch.zeros(0, k, device=device)
    finite = torch.isfinite(maps.reshape(p, -1)).all(1)  # [P]
    keep = keep_masks(torch.nan_to_num(maps.float()), f, mode).reshape(p * k, n)  # [P*K, N]
    r0 = model.embed(images)  # [P, T, D]
    npre = model.num_prefix_tokens
    out = torch.empty(p * k, device=device, dtype=torch.float32)
    for s in range(0, p * k, max_batch):
        rows = torch.arange(s, min(s + max_batch, p * k), device=device)
        img = rows // k
        kp = keep[rows]  # [B, N]
        visible = torch.cat([kp.new_ones(rows.numel(), npre), kp], dim=1)  # [B, T]
        # a sequence with no visible token at all (no prefix, nothing kept) would give NaN rows: let it see
        # everything; masked_head pools it to the all-zero feature, so the defined value is kept.
        visible = visible | ~visible.any(1, keepdim=True)
        x = model.forward_blocks(r0[img], attn_mask=visible[:, None, None, :])
        logits = masked_head(model, x, kp).float()
        out[rows] = target_score(logits, classes[img], score, model.multilabel)
    curves = out.reshape(p, k)
    return torch.where(finite[:, None], curves, torch.full_like(curves, float("nan")))


def deletion_curves(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    fractions: Sequence[float] | Tensor | None = None,
    score: Score = "prob",
    max_batch: int = 4096,
) -> Tensor:
    """Token-deletion (MIF) curves `[P, K]`; `token_perturbation_curves` with mode='deletion' (LibraGrad)."""
    return token_perturbation_curves(model, images, maps, classes, fractions, "deletion", score, max_batch)


def insertion_curves(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    fractions: Sequence[float] | Tensor | None = None,
    score: Score = "prob",
    max_batch: int = 4096,
) -> Tensor:
    """Token-insertion (LIF) curves `[P, K]`; `token_perturbation_curves` with mode='insertion' (LibraGrad)."""
    return token_perturbation_curves(model, images, maps, classes, fractions, "insertion", score, max_batch)


def curve_auc(curves: Tensor, fractions: Sequence[float] | Tensor | None = None) -> Tensor:
    """Area under curves `[P, K]` over the fraction axis by the trapezoid rule, `[P]` (LibraGrad AUC).

    With the default fractions 0..1 the area is in units of the score; a NaN curve gives a NaN area.
    """
    f = check_fractions(fractions).to(device=curves.device, dtype=curves.dtype)
    if curves.shape[-1] != f.numel():
        raise ValueError(f"curves have {curves.shape[-1]} points but there are {f.numel()} fractions")
    if f.numel() == 1:
        return torch.zeros(curves.shape[:-1], dtype=curves.dtype, device=curves.device) * curves[..., 0]
    return torch.trapezoid(curves, x=f, dim=-1)
