"""Estimators of CAAP maps (Izadi et al., arXiv 2603.13652) that run fewer patched runs than one per patch set.

Exact CAAP costs one patched run per patch set. Attribution patching (Nanda 2023; Syed et al. 2023) estimates
every patch's patched-run score to first order from one forward and one backward pass of the neutral run, and
AtP* (Kramar et al., arXiv 2403.00745) re-runs exactly where the estimate matters most. The estimators:

- `gradient`: the first-order estimate (`neutral_gradients`, `range_effects`); in hold mode the increments
  approximation of docs/caap.md ("Estimators");
- `screened`: exact runs for the patch sets with the largest estimated |effect|, the estimate elsewhere;
- `adaptive`: exact runs of k x k windows, then exact per-patch runs inside the windows with the largest
  |effect|; the other windows' effect is spread evenly over their patches.

An effect is a score minus the unpatched neutral run's score. Every estimator reads the same engine tensors
(`caap.methods.patching`), bundled per batch in a `PatchingContext`, which also counts the work done
(`EstimatorCost`, in forward-pass equivalents).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from caap.methods.patching import ChunkSize, range_scores, window_masks
from caap.models.vit import ViTClassifier
from caap.scores import Score, target_score

ESTIMATORS = ("exact", "gradient", "adaptive", "screened")


@dataclass
class EstimatorCost:
    """Work of CAAP calls, cumulated: forward-pass equivalents and what they are made of.

    One forward-pass equivalent is one sequence through all L blocks; a sequence through `m` blocks counts
    `m / L`, a backward pass through them `2 m / L`. The embedding, the head and the prefix-only last block's
    saving are not counted (they are small next to the blocks).
    """

    forward_equivalents: float = 0.0
    patched_runs: int = 0  # patched sequences run from `start` to the head
    gradient_rows: int = 0  # neutral sequences differentiated (one forward and one backward each)

    def add_blocks(self, sequences: int, blocks: int, depth: int, backward: bool = False) -> None:
        """Count `sequences` sequences through `blocks` blocks (and back, when `backward`)."""
        self.forward_equivalents += sequences * blocks * (3 if backward else 1) / max(1, depth)


def count_for_fraction(fraction: float, total: int) -> int:
    """`ceil(fraction * total)` (float noise removed): how many of `total` sets a fraction asks for."""
    return min(total, math.ceil(round(fraction * total, 9)))


def top_sets(effects: Tensor, count: int) -> Tensor:
    """`[U, n]` bool: for each image, the sets among the `count` largest `|effects|` `[U, K, n]` of any of its
    K classes (one patched run serves every class of an image)."""
    u, _, n = effects.shape
    chosen = torch.zeros(u, n, dtype=torch.bool, device=effects.device)
    if count > 0:
        order = effects.abs().topk(min(count, n), dim=-1).indices  # [U, K, count]
        chosen.scatter_(1, order.flatten(1), True)
    return chosen


@dataclass
class NeutralGradients:
    """Gradients of the target scores w.r.t. the neutral run's patch tokens, one row per (neutral, class).

    `rows` `[U, K]`: the row of each (image, class); `grads` / `tokens`: position j -> `[R, N, D]` gradient of
    the row's score w.r.t. `r_j`'s patch tokens / the neutral patch tokens of `r_j` (float32).
    """

    rows: Tensor
    grads: dict[int, Tensor]
    tokens: dict[int, Tensor]


def neutral_gradients(
    model: ViTClassifier,
    prefix: Tensor,
    targets: Tensor,
    first: int,
    positions: Collection[int],
    score: Score,
    chunk_size: int | ChunkSize = 256,
) -> NeutralGradients:
    """One forward from the neutral `r_first` `prefix` `[1 or U, T, D]` and one backward of the target score per
    distinct (neutral row, class) of `targets` `[U, K]`: the gradients at every position in `positions`
    (`>= first`). An image-independent neutral context needs one row per class, whatever the batch size.
    `delta` differentiates the logit (the reference is a constant)."""
    wanted = sorted(set(positions))
    if not wanted or wanted[0] < first:
        raise ValueError(f"positions {wanted} must be non-empty and >= first={first}")
    u, _ = targets.shape
    classes, p = model.num_classes, model.num_prefix_tokens
    which = torch.arange(u, device=targets.device) if prefix.shape[0] > 1 else torch.zeros_like(targets[:, 0])
    keys, rows = torch.unique(which[:, None] * classes + targets, return_inverse=True)  # rows [U, K]
    row_prefix, row_class = keys // classes, keys % classes
    grads: dict[int, list[Tensor]] = {j: [] for j in wanted}
    tokens: dict[int, list[Tensor]] = {j: [] for j in wanted}
    differentiated = "logit" if score == "delta" else score
    step = max(1, int(chunk_size))
    for r0 in range(0, keys.numel(), step):
        sel = slice(r0, r0 + step)
        with torch.enable_grad():
            x = prefix.detach()[row_prefix[sel].to(prefix.device)].requires_grad_(True)
            at = {first: x}
            for j in range(first, model.depth):
                x = model.blocks[j](x)
                at[j + 1] = x
            logits = model.head(x).float()
            value = target_score(logits, row_class[sel].to(logits.device), differentiated, model.multilabel)
            got = torch.autograd.grad(value.sum(), [at[j] for j in wanted])
        for j, g in zip(wanted, got, strict=True):
            grads[j].append(g[:, p:].float())
            tokens[j].append(at[j].detach()[:, p:].float())
    return NeutralGradients(
        rows=rows,
        grads={j: torch.cat(v) for j, v in grads.items()},
        tokens={j: torch.cat(v) for j, v in tokens.items()},
    )


def range_effects(
    gradients: NeutralGradients,
    states: Mapping[int, Tensor],
    ranges: Sequence[tuple[int, int]],
    mode: str,
) -> Iterator[tuple[tuple[int, int], Tensor]]:
    """First-order effects `[U, K, N]` of patching each single patch, for each range `(start, stop)`.

    With `d_j = source - neutral` patch tokens at position j and `g_j` the neutral run's gradient there:
    inject `g_start . d_start`; hold `g_start . d_start + sum_{start < j < stop} g_j . (d_j - d_{j-1})`
    (the held token as additive corrections; each correction's first-order part without the change of the
    held token's own block update, see docs/caap.md). Yields in the order of `ranges`.
    """
    rows = gradients.rows

    def diff(j: int) -> Tensor:  # d_j [U, N, D]
        return states[j].float() - gradients.tokens[j][rows[:, 0]]

    def dot(j: int, d: Tensor) -> Tensor:  # g_j . d per (image, class, patch) [U, K, N]
        return (gradients.grads[j][rows] * d[:, None]).sum(-1)

    injected: dict[int, Tensor] = {}
    increments: dict[int, Tensor] = {}
    for start, stop in ranges:
        if start not in injected:
            injected[start] = dot(start, diff(start))
        total = injected[start]
        if mode == "hold":
            for j in range(start + 1, stop):
                if j not in increments:
                    increments[j] = dot(j, diff(j) - diff(j - 1))
                total = total + increments[j]
        yield (start, stop), total


@dataclass
class PatchingContext:
    """One batch's engine tensors, shared by the estimators, and the cost counter they add to.

    `states`: source patch tokens per position `[U, N, D]`; `prefixes`: per neutral sample `{start: r_start
    [1 or U, T, D]}`; `neutral_logits` `[S, 1 or U, C]`; `targets` `[U, K]` (see `caap.methods.patching`).
    Scores of several neutral samples are averaged (summed, then divided, as exact CAAP does).
    """

    model: ViTClassifier
    states: Mapping[int, Tensor]
    prefixes: list[dict[int, Tensor]]
    neutral_logits: Tensor
    targets: Tensor
    mode: str
    score: Score
    chunk_size: int | ChunkSize
    head_tokens_only: bool = True
    cost: EstimatorCost = field(default_factory=EstimatorCost)
    compile: bool = False  # exact runs' blocks under torch.compile (`caap.methods.patching.patched_runs`)

    @property
    def images(self) -> int:
        return int(self.targets.shape[0])

    def neutral_scores(self) -> Tensor:
        """The unpatched neutral run's target scores `[U, K]`, averaged over samples (0 for `delta`)."""
        if self.score == "delta":
            return torch.zeros(self.targets.shape, dtype=torch.float32, device=self.targets.device)
        total = torch.zeros(self.targets.shape, dtype=torch.float32, device=self.targets.device)
        for logits in self.neutral_logits:
            lg = logits.to(self.targets.device).expand(self.images, -1)
            total = total + target_score(lg, self.targets, self.score, self.model.multilabel)
        return total / len(self.neutral_logits)

    def exact(
        self, masks: Tensor, start: int, stops: Sequence[int], pairs: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Exact patched-run scores `{stop: [U, K, n]}` of the sets `masks` `[n, N]` (`{stop: [Q, K]}` for the
        `(image, set)` rows of `pairs` `[Q, 2]`), averaged over the neutral samples."""
        total: dict[int, Tensor] = {}
        with torch.no_grad():
            for at, nl in zip(self.prefixes, self.neutral_logits, strict=True):
                scores = range_scores(
                    self.model, self.states, at[start], self.targets, masks, start, stops, self.mode,
                    self.score, self.chunk_size, nl, self.head_tokens_only, pairs, self.compile,
                )  # fmt: skip
                total = scores if not total else {e: total[e] + scores[e] for e in stops}
        runs = self.images * masks.shape[0] if pairs is None else int(pairs.shape[0])
        depth = self.model.depth
        blocks = depth - start
        if self.mode == "hold":
            blocks += sum(depth - e for e in stops if e < max(stops))  # branches leave the trunk at e
        self.cost.patched_runs += runs * len(self.prefixes)
        self.cost.add_blocks(runs * len(self.prefixes), blocks, depth)
        return {e: v / len(self.prefixes) for e, v in total.items()}

    def gradient(self, ranges: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Tensor]:
        """First-order effects `{range: [U, K, N]}` (`range_effects`), averaged over the neutral samples."""
        first = min(s for s, _ in ranges)
        positions = {j for s, e in ranges for j in (range(s, e) if self.mode == "hold" else [s])}
        total: dict[tuple[int, int], Tensor] = {}
        for at in self.prefixes:
            grads = neutral_gradients(
                self.model, at[first], self.targets, first, positions, self.score, self.chunk_size
            )
            self.cost.gradient_rows += int(grads.grads[first].shape[0])
            self.cost.add_blocks(
                int(grads.grads[first].shape[0]), self.model.depth - first, self.model.depth, True
            )
            for r, eff in range_effects(grads, self.states, ranges, self.mode):
                total[r] = eff if r not in total else total[r] + eff
        return {r: v / len(self.prefixes) for r, v in total.items()}


def gradient_scores(
    ctx: PatchingContext, masks: Tensor, ranges: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], Tensor]:
    """`gradient` estimator: scores `{range: [U, K, n]}` of the sets `masks` `[n, N]`, the neutral score plus
    the sum of the set's single-patch first-order effects (first order is additive over patches)."""
    base = ctx.neutral_scores()[..., None]
    weights = masks.to(base.device, torch.float32).T  # [N, n]
    return {r: base + eff @ weights for r, eff in ctx.gradient(ranges).items()}


def screened_scores(ctx: PatchingContext, masks: Tensor, start: int, stop: int, fraction: float) -> Tensor:
    """`screened` estimator (AtP*-style): scores `[U, K, n]`; per (image, class) the `ceil(fraction * n)` sets of
    largest estimated |effect| get their exact score (a run serves every class of its image), the others keep
    the `gradient` estimate. `fraction = 1` is exact CAAP, `0` the gradient estimate."""
    estimate = gradient_scores(ctx, masks, [(start, stop)])[(start, stop)]
    effects = estimate - ctx.neutral_scores()[..., None]
    pairs = top_sets(effects, count_for_fraction(fraction, masks.shape[0])).nonzero()  # [Q, 2] (image, set)
    if pairs.numel():
        exact = ctx.exact(masks, start, [stop], pairs)[stop]  # [Q, K]
        estimate[pairs[:, 0], :, pairs[:, 1]] = exact.to(estimate.device)
    return estimate


def adaptive_scores(
    ctx: PatchingContext, grid: tuple[int, int], start: int, stop: int, window: int, refine: float
) -> Tensor:
    """`adaptive` estimator: per-patch scores `[U, K, N]`. Exact runs of `window x window` windows; per
    (image, class) the `ceil(refine * windows)` windows of largest |effect| among those of several patches are
    rerun patch by patch (a run serves every class of its image); every other patch gets `neutral + window effect / patches in window`.
    `window = 1` or `refine = 1` is exact CAAP."""
    gh, gw = grid
    device = ctx.targets.device
    windows, index = window_masks(gh, gw, window, device)
    scores = ctx.exact(windows, start, [stop])[stop]  # [U, K, n]
    base = ctx.neutral_scores()[..., None]
    effects = scores - base
    size = windows.sum(1).to(scores.dtype)  # [n]
    spread = torch.where(size[index] == 1, scores[..., index], base + (effects / size)[..., index])
    refinable = effects * (size > 1)  # single-patch windows are exact already
    chosen = top_sets(refinable, count_for_fraction(refine, windows.shape[0])) & (size > 1)
    pairs = chosen[:, index].nonzero()  # [Q, 2] (image, patch)
    if pairs.numel():
        patches, _ = window_masks(gh, gw, 1, device)
        exact = ctx.exact(patches, start, [stop], pairs)[stop]
        spread[pairs[:, 0], :, pairs[:, 1]] = exact.to(spread.device)
    return spread
