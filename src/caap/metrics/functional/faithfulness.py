"""LibraGrad's MIF / LIF curves (Mehri et al., CVPR 2025, arXiv 2411.16760): patch tokens removed in map order.

Patches are ranked by signed attribution (`caap.token_removal.patch_ranking`, ties by position); at each ratio
r MIF removes the `floor(r * N)` highest-ranked patches and LIF keeps the `floor((1 - r) * N)` highest-ranked
(LibraGrad's official counts, `removal_counts`); the token-removal engine removes them
(`removal`: `drop` as in LibraGrad, or `replace` by a token reference of `caap.references`; prefix tokens are
kept). A curve `[P, K + 1]` holds the target's score (`caap.scores.CURVE_SCORES`) at the unmasked end r = 0
(one plain forward) and after each ratio; a map with a non-finite entry has no ranking and gives a NaN curve.
Every (pair, order, ratio) of a batch runs through one engine call, so both orders share their batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from caap.models.vit import ViTClassifier
from caap.references import ZERO_TOKENS, build_token_reference, reference_tokens
from caap.scores import CURVE_SCORES, DROP_SCORES, Outcomes, check_score, score_curves, target_outcomes
from caap.token_removal import check_removal as check_model_removal
from caap.token_removal import patch_ranks, removal_logits

Order = Literal["mif", "lif"]
ORDERS: tuple[str, ...] = ("mif", "lif")
REMOVALS: tuple[str, ...] = ("drop", "replace")
REPLACE_BASELINES: tuple[str, ...] = ("black", "mean_color", "blur", ZERO_TOKENS)
"""The token references `removal=replace` accepts (`caap.references`)."""
DEFAULT_RATIOS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))
"""0.1, ..., 0.9: LibraGrad's removal ratios; the unmasked end 0 is added by `removal_axis`."""


def check_ratios(ratios: Sequence[float] | Tensor | None) -> Tensor:
    """Removal ratios `[K]` float64, strictly increasing in (0, 1]; None gives `DEFAULT_RATIOS`.

    A leading 0 is accepted and dropped (the unmasked end is always part of the curve, see `removal_axis`).
    """
    if ratios is None:
        ratios = DEFAULT_RATIOS
    if not isinstance(ratios, Tensor):
        ratios = [float(x) for x in ratios]  # also an OmegaConf ListConfig from Hydra
    r = torch.as_tensor(ratios, dtype=torch.float64).reshape(-1)
    if r.numel() and float(r[0]) == 0.0:
        r = r[1:]
    if r.numel() == 0:
        raise ValueError("ratios is empty; give at least one removal ratio in (0, 1], e.g. [0.1, ..., 0.9]")
    if not bool(((r > 0) & (r <= 1)).all()):
        raise ValueError(f"ratios must lie in (0, 1], got {r.tolist()}")
    if r.numel() > 1 and not bool((r[1:] > r[:-1]).all()):
        raise ValueError(f"ratios must be strictly increasing, got {r.tolist()}")
    return r


def removal_axis(ratios: Sequence[float] | Tensor | None) -> Tensor:
    """The curve's x axis `[K + 1]`: 0 (the unmasked end) followed by the removal ratios."""
    r = check_ratios(ratios)
    return torch.cat([r.new_zeros(1), r])


def removal_counts(n: int, ratios: Sequence[float] | Tensor | None, order: str = "mif") -> list[int]:
    """Patches removed at each ratio r for `order`, LibraGrad's official rule: MIF removes the top `floor(r n)`,
    LIF keeps the top `floor((1 - r) n)`, i.e. removes `n - floor((1 - r) n)`.

    Official: decompv `transform_mask_by_attributions` masks the top `int(q * N)` patches (timm-fork
    `threshold_filter`) for q = 0.1, ..., 0.9; MIF at r is `nratio r`, LIF at r is `topratio (1 - r)`. Each ratio
    is read as the decimal it prints as (`Fraction(repr(r))`) and the floor is exact, so float noise cannot move
    a count (float `int(0.7 * 90)` is 62, the exact floor 63; no square grid below 90 x 90 is affected).
    """
    if order not in ORDERS:
        raise ValueError(f"order '{order}' is not supported; allowed: {list(ORDERS)}")
    exact = [Fraction(repr(float(x))) for x in check_ratios(ratios)]
    if order == "mif":
        return [math.floor(r * n) for r in exact]
    return [n - math.floor((1 - r) * n) for r in exact]


def higher_is_better(order: str, score: str) -> bool:
    """Whether a larger area is better for `order` in mif / lif / srg (SRG = LIF - MIF) and `score`."""
    check_score(score, CURVE_SCORES)
    if order not in (*ORDERS, "srg"):
        raise ValueError(f"order must be 'mif', 'lif' or 'srg', got '{order}'")
    plain = order != "mif"  # LIF and SRG: a larger probability / logit / accuracy is better
    return plain != (score in DROP_SCORES)


def check_removal(model: ViTClassifier, removal: str) -> None:
    """Raise a clear error when `removal` is not drop / replace, or `drop` is impossible for this model."""
    if removal not in REMOVALS:
        raise ValueError(f"removal='{removal}' is not supported; allowed: {list(REMOVALS)}")
    hint = "; use removal=replace (tokens replaced by a neutral or blurred image's tokens)"
    check_model_removal(model, removal, "token removal (removal=drop)", hint)


def keep_masks(rank: Tensor, keys: Sequence[tuple[str, int]]) -> Tensor:
    """Kept patches `[len(keys) * P, N]` bool, key-major, for patch ranks `[P, N]` and `(order, count)` keys:
    MIF removes the `count` highest-ranked patches, LIF the `count` lowest-ranked."""
    n = rank.shape[1]
    return torch.cat([rank >= c if o == "mif" else rank < n - c for o, c in keys])


@torch.no_grad()
def token_removal_outcomes(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    ratios: Sequence[float] | Tensor | None = None,
    orders: Sequence[str] = ORDERS,
    removal: str = "drop",
    baseline: str | Mapping[str, Any] = "black",
    max_batch: int = 4096,
) -> dict[str, Outcomes]:
    """Outcomes `[P, K]` per order in `orders` after removing patch tokens at each ratio (see module docstring).

    Args:
        model: the classifier; nothing is changed on it.
        images: `[P, 3, H, W]` pixel space in [0, 1].
        maps: `[P, gh, gw]` signed patch-grid attributions.
        classes: `[P]` target class per map.
        ratios: K removal ratios in (0, 1]; default 0.1, ..., 0.9.
        orders: which of 'mif' / 'lif' to compute; they share the batches.
        removal: 'drop' (tokens leave the sequence) or 'replace' (tokens replaced by `baseline`'s).
        baseline: for 'replace': 'black', 'mean_color', 'blur' (or a mapping with options) or 'zero_tokens'.
        max_batch: most sequences per forward pass.

    Returns:
        `{order: Outcomes}` with `[P, K]` float32 tensors on the model's device; rows of maps with a non-finite
        entry are NaN.
    """
    for o in orders:
        if o not in ORDERS:
            raise ValueError(f"order '{o}' is not supported; allowed: {list(ORDERS)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    check_removal(model, removal)
    device = next(model.parameters()).device
    images, maps, classes = images.to(device), maps.to(device), classes.to(device).long()
    gh, gw = model.grid_size(images)
    if tuple(maps.shape[1:]) != (gh, gw):
        raise ValueError(f"maps have shape {tuple(maps.shape)}, expected [P, {gh}, {gw}] for these images")
    counts = {o: removal_counts(gh * gw, ratios, o) for o in orders}
    p, k = maps.shape[0], len(check_ratios(ratios))
    empty = torch.zeros(p, k, device=device)
    if p == 0:
        return {o: Outcomes(empty, empty, empty) for o in orders}
    finite = torch.isfinite(maps.reshape(p, -1)).all(1)  # [P]
    rank = patch_ranks(torch.nan_to_num(maps.float()))  # [P, N]
    keys = [(o, step) for o in orders for step in range(k)]  # rows: key i, pair j is row i * P + j
    keep = keep_masks(rank, [(o, counts[o][step]) for o, step in keys])  # [len(keys) * P, N]
    rows = torch.arange(p, device=device).repeat(len(keys))
    r0 = model.embed(images)  # [P, T, D]
    base = None
    if removal == "replace":
        reference = build_token_reference(baseline, "baseline", REPLACE_BASELINES)
        base = reference_tokens(model, images, reference)  # [P, T, D]
    logits = removal_logits(model, r0, keep, rows, removal, base, max_batch)  # type: ignore[arg-type]
    res = target_outcomes(logits, classes[rows], model.multilabel).reshape(len(keys), p)
    out = {o: Outcomes(*(torch.empty(p, k, device=device) for _ in range(3))) for o in orders}
    for i, (o, step) in enumerate(keys):
        for dst, src in zip(out[o], res, strict=True):
            dst[:, step] = src[i]

    bad = ~finite[:, None]
    return {
        o: Outcomes(*(torch.where(bad, torch.full_like(t, float("nan")), t) for t in res))
        for o, res in out.items()
    }


@torch.no_grad()
def unperturbed_outcomes(model: ViTClassifier, images: Tensor, classes: Tensor) -> Outcomes:
    """Outcomes `[P]` of the plain forward pass (the unmasked end of every curve)."""
    device = next(model.parameters()).device
    return target_outcomes(model(images.to(device)), classes.to(device), model.multilabel)


def faithfulness_curves(
    model: ViTClassifier,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    order: str = "mif",
    score: str = "prob",
    ratios: Sequence[float] | Tensor | None = None,
    removal: str = "drop",
    baseline: str | Mapping[str, Any] = "black",
    max_batch: int = 4096,
) -> Tensor:
    """Curves `[P, K + 1]` of `score` for `order` in mif / lif / srg (SRG: LIF curve minus MIF curve) over
    `removal_axis(ratios)`; one call computes what it needs (the metrics share this work through a cache)."""
    check_score(score, CURVE_SCORES)
    check_removal(model, removal)  # before any forward pass
    needed = ORDERS if order == "srg" else (order,)
    full = unperturbed_outcomes(model, images, classes)
    pert = token_removal_outcomes(model, images, maps, classes, ratios, needed, removal, baseline, max_batch)
    curves = {o: score_curves(full, pert[o], score) for o in needed}
    return curves["lif"] - curves["mif"] if order == "srg" else curves[order]
