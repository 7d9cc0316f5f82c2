"""LibraGrad faithfulness: MIF / LIF curves by removing patch tokens, batched over pairs, steps and both orders.

LibraGrad (Mehri, Soleymani Baghshah and Pilehvar, CVPR 2025, arXiv 2411.16760; evaluation code
NightMachinery/decompv-libragrad-v1) ranks the patch tokens by signed attribution and removes a ratio r of
them from the token sequence (the prefix tokens, CLS and registers, are always kept):

- MIF ("most influential first"): the `round(r * N)` highest-ranked patches are removed. Lower is better for
  the target's probability, logit and top-1 accuracy.
- LIF ("least influential first"): the `round(r * N)` lowest-ranked patches are removed. Higher is better.
- SRG = LIF - MIF (the area between the two curves), higher is better for probability, logit, accuracy.

Per removal ratio the curve holds one of these scores of the target class (`caap.scores.CURVE_SCORES`):

| score      | value at ratio r                                   | MIF better | LIF better |
|------------|----------------------------------------------------|------------|------------|
| `prob`     | p_r (sigmoid for multi-label heads, else softmax)  | lower      | higher     |
| `logit`    | z_r                                                | lower      | higher     |
| `top1`     | 1 if the target is the arg-max class, else 0       | lower      | higher     |
| `aopc`     | p_0 - p_r (LibraGrad's per-ratio AOPC)             | higher     | lower      |
| `log_odds` | log p_0 - log p_r (LibraGrad's "LOdds")            | higher     | lower      |

(`top1` asks whether the target is the model's arg-max class; on a multi-label image only one present class
can be, so its unperturbed value averages below 1 under target=label. `aopc` and `log_odds` are drops from
the unperturbed value, as in PyNight's `compute_aopc_lodds` that the LibraGrad harness calls, so they flip
the direction.) The area is the trapezoid rule over the ratio axis
*including the unmasked end* r = 0 (`removal_axis`): with the default ratios 0.1 .. 0.9 the x axis is
0, 0.1, ..., 0.9, as in LibraGrad's tables. The unperturbed value comes from one plain forward.

Removal (`removal`):
- `drop` (LibraGrad): the removed tokens are physically taken out of the sequence (gathered from `r_0`, the
  token embeddings after the position embedding, so every kept token keeps its own position), and the
  model's own head pools what is left: CLS pooling reads the CLS token, average pooling averages the kept
  tokens only (and the prefix tokens when the model pools them too). All sequences of one length, i.e. every
  (pair, MIF step r) and (pair, LIF step r) at once, run as one batch without any attention mask. (A
  measurement on the FashionGrid model on CPU found one padded, key-masked batch over all lengths 2x slower
  than exact-length groups: the padding doubles the tokens and the masks take SDPA off its fast path.) A
  model whose pooling cannot take a shorter sequence is refused with an error naming `removal=replace`.
- `replace`: the removed patch tokens of `r_0` are replaced by those of a baseline at the same positions
  (`caap.references`): the token embeddings of a reference image (`black`, `mean_color` = the model's
  normalisation mean, i.e. a zero input), of the Gaussian-blurred image (`blur`), or all-zero tokens
  (`zero_tokens`, LibraGrad's MLP-Mixer rule). The sequence keeps its length, so all (pair, order, step) rows pack into `max_batch` chunks.

Ranking: a stable descending sort of the signed map, ties by row-major patch position (so a constant map
removes patches in reading order); counts are `round(r * N)` (Python rounding). A map with a non-finite
entry has no ranking: its curves are NaN (skipped and counted by `AttributionMetric.compute`). When every
patch is removed from a model that pools patches only, the pooled feature of the empty set is defined as the
all-zero vector, as in `token_perturbation.masked_head`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from caap.metrics.functional.token_perturbation import patch_ranking
from caap.models.vit import ViTClassifier
from caap.references import ZERO_TOKENS, build_token_reference, reference_tokens
from caap.scores import CURVE_SCORES, DROP_SCORES, Outcomes, check_score, score_curves, target_outcomes

Order = Literal["mif", "lif"]
ORDERS: tuple[str, ...] = ("mif", "lif")
REMOVALS: tuple[str, ...] = ("drop", "replace")
REPLACE_BASELINES: tuple[str, ...] = ("black", "mean_color", "blur", ZERO_TOKENS)
"""The token references `removal=replace` accepts (`caap.references`)."""
DEFAULT_RATIOS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))
"""0.1, ..., 0.9: LibraGrad's removal ratios; the unmasked end 0 is added by `removal_axis`."""

_PATCH_POOLS = ("avg", "max", "avgmax")


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


def removal_counts(n: int, ratios: Sequence[float] | Tensor | None) -> list[int]:
    """Patches removed at each ratio: `round(r * n)` (Python rounding, robust to float noise)."""
    return [round(float(x) * n) for x in check_ratios(ratios)]


def higher_is_better(order: str, score: str) -> bool:
    """Whether a larger area is better for `order` in mif / lif / srg (SRG = LIF - MIF) and `score`."""
    check_score(score, CURVE_SCORES)
    if order not in (*ORDERS, "srg"):
        raise ValueError(f"order must be 'mif', 'lif' or 'srg', got '{order}'")
    plain = order != "mif"  # LIF and SRG: a larger probability / logit / accuracy is better
    return plain != (score in DROP_SCORES)


def can_drop_tokens(model: ViTClassifier) -> bool:
    """Whether `model`'s head takes a shorter token sequence: a model may say so (`can_drop_tokens`), else
    timm's pooling decides (token pooling with a CLS token, or avg / max / avgmax over the tokens left)."""
    declared = getattr(model, "can_drop_tokens", None)
    if declared is not None:
        return bool(declared)
    if not getattr(model, "has_attention", True):  # MLP-Mixer: token-mixing MLPs need the full sequence
        return False
    pool = getattr(getattr(model, "model", None), "global_pool", None)
    if pool == "token":
        return model.num_prefix_tokens > 0
    return pool in _PATCH_POOLS


def check_removal(model: ViTClassifier, removal: str) -> None:
    """Raise a clear error when `removal` is unknown or `drop` is impossible for this model's pooling."""
    if removal not in REMOVALS:
        raise ValueError(f"removal='{removal}' is not supported; allowed: {list(REMOVALS)}")
    if removal == "drop" and not can_drop_tokens(model):
        pool = getattr(getattr(model, "model", None), "global_pool", None)
        raise ValueError(
            f"model '{getattr(model, 'name', type(model).__name__)}' cannot drop tokens (global_pool={pool!r}, "
            f"{model.num_prefix_tokens} prefix tokens: its head needs the full token grid); use removal=replace "
            f"(tokens replaced by a neutral or blurred image's tokens)"
        )


def _empty_pool_logits(model: ViTClassifier, b: int, d: int, device: torch.device) -> Tensor:
    """Logits `[b, C]` of a patch-pooling head over the empty set: the all-zero pooled feature."""
    m = model.model
    return m.head(m.head_drop(m.fc_norm(torch.zeros(b, d, device=device))))


def _kept_indices(order: Tensor, which: str, kept: int) -> Tensor:
    """Kept patch indices `[P, kept]`, ascending: MIF keeps the `kept` lowest-ranked, LIF the highest-ranked."""
    n = order.shape[1]
    idx = order[:, n - kept :] if which == "mif" else order[:, :kept]
    return idx.sort(dim=1).values


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
    counts = removal_counts(gh * gw, ratios)
    p, k, n, npre = maps.shape[0], len(counts), gh * gw, model.num_prefix_tokens
    empty = torch.zeros(p, k, device=device)
    if p == 0:
        return {o: Outcomes(empty, empty, empty) for o in orders}
    finite = torch.isfinite(maps.reshape(p, -1)).all(1)  # [P]
    order = patch_ranking(torch.nan_to_num(maps.float()))  # [P, N]
    r0 = model.embed(images)  # [P, T, D]
    d = r0.shape[-1]
    pairs = torch.arange(p, device=device)
    # rows are (order, step) keys x pairs: key i, pair j is row i * P + j of a group's batch
    out = {o: Outcomes(*(torch.full((p, k), float("nan"), device=device) for _ in range(3))) for o in orders}

    def store(keys: list[tuple[str, int]], logits: Tensor, rows_pair: Tensor) -> None:
        res = target_outcomes(logits, classes[rows_pair], model.multilabel)
        for i, (o, step) in enumerate(keys):
            sl = slice(i * p, (i + 1) * p)
            for dst, src in zip(out[o], res, strict=True):
                dst[:, step] = src[sl]

    if removal == "drop":
        groups: dict[int, list[tuple[str, int]]] = {}
        for step, c in enumerate(counts):
            for o in orders:
                groups.setdefault(n - c, []).append((o, step))
        prefix = torch.arange(npre, device=device).expand(p, npre)
        for kept, keys in groups.items():
            idx = torch.cat([_kept_indices(order, o, kept) for o, _ in keys])  # [G*P, kept]
            rows_pair = pairs.repeat(len(keys))
            tok = torch.cat([prefix.repeat(len(keys), 1), idx + npre], dim=1)  # [G*P, npre + kept]
            logits = []
            for s in range(0, tok.shape[0], max_batch):
                t, rp = tok[s : s + max_batch], rows_pair[s : s + max_batch]
                if (
                    kept == 0
                    and model.model.global_pool != "token"
                    and not (npre and model.model.pool_include_prefix)
                ):
                    logits.append(_empty_pool_logits(model, t.shape[0], d, device))
                    continue
                seq = r0[rp[:, None], t]  # [B, npre + kept, D]
                logits.append(model.head(model.forward_blocks(seq)))
            store(keys, torch.cat(logits), rows_pair)
    else:
        reference = build_token_reference(baseline, "baseline", REPLACE_BASELINES)
        base = reference_tokens(model, images, reference)  # [P, T, D]
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=device).expand(p, n))  # rank of each patch
        keys = [(o, step) for o in orders for step in range(k)]
        rows_pair = pairs.repeat(len(keys))
        rows_key = torch.arange(len(keys), device=device).repeat_interleave(p)
        # patch removed <=> MIF: rank < c; LIF: rank >= n - c
        key_c = torch.tensor([counts[s] for _, s in keys], device=device)
        key_lif = torch.tensor([o == "lif" for o, _ in keys], device=device)
        logits = []
        for s in range(0, rows_pair.numel(), max_batch):
            rp, rk = rows_pair[s : s + max_batch], rows_key[s : s + max_batch]
            rr, c, lif = rank[rp], key_c[rk][:, None], key_lif[rk][:, None]
            removed = torch.where(lif, rr >= n - c, rr < c)  # [B, N]
            seq = r0[rp].clone()
            seq[:, npre:] = torch.where(removed[..., None], base[rp, npre:], seq[:, npre:])
            logits.append(model.head(model.forward_blocks(seq)))
        store(keys, torch.cat(logits), rows_pair)

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
