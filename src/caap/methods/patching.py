"""CAAP's patched-run engine (Izadi et al., arXiv 2603.13652): batched activation patching of patch tokens.

A patched run starts from a neutral context's residual `r_start` `[T, D]`, overwrites the tokens of one patch
set with the source image's tokens `r_j[i]` at given residual positions j, and runs the remaining blocks and the
head. The engine batches (images x patch sets) into chunks of sequences, writing the source tokens with index
ops; one source pass caches only the patch tokens of the positions needed, one neutral pass gives `r_start`
for every start and the unpatched neutral logits.

`patched_runs` is the one loop. Besides its trunk run it has optional branch points: at a branch position e a
copy of the run leaves the trunk before the trunk's write at e and finishes without writing. Hold-mode runs of
the ranges (s, e) and (s, e') agree through block e - 1, so the ranges of one start share one trunk
(`range_scores`): exact CAAP is the case of one range, layer selection the case of many.

Patch sets are explicit boolean masks `[n, N]`, so that "no patch" and "all patches" can be tested; the loop
reads them as a `PatchLayout` (index arithmetic on the device, no host read-back per chunk). On a GPU a chunk
that runs out of memory is halved and retried (`ChunkSize`); `compile=True` runs the blocks of the patched runs
under `torch.compile` with equal, padded chunks (one graph per chunk shape).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from caap.methods.option_checks import check_choice
from caap.models.memory import estimate_sequence_bytes
from caap.models.prefix_only import prefix_only_last_block
from caap.models.vit import ViTClassifier
from caap.scores import Score, check_score, target_score

log = logging.getLogger(__name__)

MODES = ("hold", "inject")

# cache-sized chunks are fastest on the CPU; on a GPU half the free memory
_DEFAULT_CPU_BUDGET_MB = 64.0
_CUDA_FREE_FRACTION = 0.5
_MAX_CHUNK = 8192


def patch_positions(start: int, stop: int, mode: str) -> list[int]:
    """The residual positions where the source tokens are written: `range(start, stop)` (hold) or `[start]`."""
    check_choice("mode", mode, MODES)
    return list(range(start, stop)) if mode == "hold" else [start]


def window_masks(
    gh: int, gw: int, window: int = 1, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Non-overlapping `window x window` patch windows over a `gh x gw` grid (edge windows may be smaller).

    Returns:
        masks: `[n, N]` bool, row w marks the patches (row-major, `N = gh * gw`) of window w, with
            `n = ceil(gh / window) * ceil(gw / window)`.
        index: `[N]` long, the window of each patch (to spread window scores back to the patch grid).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an integer >= 1 (k x k patch windows)")
    nww = math.ceil(gw / window)
    rows = torch.arange(gh, device=device) // window
    cols = torch.arange(gw, device=device) // window
    index = (rows[:, None] * nww + cols[None, :]).reshape(-1)
    n = math.ceil(gh / window) * nww
    masks = torch.zeros(n, gh * gw, dtype=torch.bool, device=device)
    masks[index, torch.arange(gh * gw, device=device)] = True
    return masks, index


def group_rows_by_image(images: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distinct images and the classes asked of each (rows that repeat an image share its patched runs).

    Returns `unique [U, 3, H, W]`, `targets [U, K]` (K = most rows sharing one image; short groups padded
    with their first class), and per input row its image `inverse [B]` and column `slot [B]`, so that
    `targets[inverse, slot] == target`.
    """
    unique, inverse = torch.unique(images.flatten(1), dim=0, return_inverse=True)
    u = unique.shape[0]
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=u)
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(inverse)
    slot[order] = torch.arange(inverse.numel(), device=inverse.device) - starts[inverse[order]]
    targets = target[order[starts]][:, None].repeat(1, int(counts.max()))
    targets[inverse, slot] = target
    return unique.view(u, *images.shape[1:]), targets, inverse, slot


def cast_images(model: ViTClassifier, images: Tensor) -> Tensor:
    """Images in the dtype of a model held in low precision (without autocast the patch embedding needs it)."""
    weight = model.patch_embed.proj.weight
    if (
        images.is_floating_point()
        and images.dtype != weight.dtype
        and not torch.is_autocast_enabled(images.device.type)
    ):
        return images.to(weight.dtype)
    return images


def compute_dtype(model: ViTClassifier, device: torch.device) -> torch.dtype:
    """The dtype blocks compute in on `device`: autocast's when enabled, else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.patch_embed.proj.weight.dtype


def resolve_chunk_size(
    model: ViTClassifier,
    num_tokens: int,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> int:
    """Number of patched sequences per pass: `chunk_size`, or derived from a memory budget.

    With `memory_budget_mb` the chunk is `budget // estimate_sequence_bytes(...)`; with neither, the budget
    is half the free CUDA memory on a GPU, or 64 MB on the CPU. At least 1, at most 8192.
    """
    if chunk_size is not None:
        return int(chunk_size)
    device = torch.device(device)
    if memory_budget_mb is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * _CUDA_FREE_FRACTION
        else:
            budget = _DEFAULT_CPU_BUDGET_MB * 2**20
    else:
        budget = float(memory_budget_mb) * 2**20
    per_seq = estimate_sequence_bytes(model, num_tokens, dtype)
    return int(max(1, min(_MAX_CHUNK, budget // per_seq)))


# -- source and neutral passes ---------------------------------------------------------------------------------
def source_states(model: ViTClassifier, images: Tensor, positions: Collection[int]) -> dict[int, Tensor]:
    """One source pass: the patch tokens `r_j[:, P:]` `[B, N, D]` for each position j in `positions` (0..L).

    Only the blocks up to `max(positions) - 1` run; nothing else is kept.
    """
    wanted = set(positions)
    if not wanted:
        return {}
    p = model.num_prefix_tokens
    x = model.embed(cast_images(model, images))
    states: dict[int, Tensor] = {}
    if 0 in wanted:
        states[0] = x[:, p:]
    for j in range(max(wanted)):
        x = model.blocks[j](x)
        if j + 1 in wanted:
            states[j + 1] = x[:, p:]
    return states


def neutral_states(
    model: ViTClassifier, neutral_images: Tensor, starts: Collection[int]
) -> tuple[dict[int, Tensor], Tensor]:
    """One neutral pass over pixel-space neutral images `[Bn, 3, H, W]`: the residuals `{start: r_start}`
    `[Bn, T, D]` for every start in `starts`, and the unpatched neutral logits `[Bn, C]` (float32)."""
    x = model.embed(cast_images(model, neutral_images))
    prefixes: dict[int, Tensor] = {}
    for j in range(model.depth + 1):
        if j in starts:
            prefixes[j] = x
        if j < model.depth:
            x = model.blocks[j](x)
    return prefixes, model.head(x).float()


def neutral_prefix(model: ViTClassifier, neutral_images: Tensor, start: int) -> Tensor:
    """The neutral residual `r_start` `[Bn, T, D]` for pixel-space neutral images `[Bn, 3, H, W]`."""
    return model.forward_blocks(model.embed(cast_images(model, neutral_images)), 0, start)


def unpatched_logits(model: ViTClassifier, prefix: Tensor, start: int) -> Tensor:
    """Unpatched neutral logits `[Bn, C]` from the neutral `r_start` `[Bn, T, D]`."""
    return model.head(model.forward_blocks(prefix, start)).float()


# -- the patched runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchLayout:
    """The patched tokens of the patch sets `masks [n, N]`, flattened so that a chunk of patched runs finds its
    tokens by index arithmetic on the device (no host read-back inside the chunk loop).

    Entry e of the infinite sequence "image 0's sets, image 1's sets, ..." is patch `patches[e % M]` of set
    `sets[e % M]` of image `e // M` (`M` = patched tokens of all sets; sorted by set, then patch); the entries
    of the runs `q0 <= q < q1` (`q = b * n + w`) are `entry(q0) <= e < entry(q1)`.
    """

    num_sets: int
    num_patches: int
    sets: Tensor  # [M] long, the set w of each patched token
    patches: Tensor  # [M] long, its patch index in 0..N-1
    offsets: tuple[int, ...]  # [n + 1] host ints: set w's entries are offsets[w] <= e < offsets[w + 1]
    masks: Tensor  # [n, N] bool on the device (runs of explicit pairs over sets of unequal sizes)

    @property
    def set_size(self) -> int | None:
        """The number of patches of every set when all sets have as many, else None."""
        sizes = {b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)}
        return sizes.pop() if len(sizes) == 1 else None

    @classmethod
    def of(cls, masks: Tensor, device: torch.device | str | None = None) -> PatchLayout:
        """The layout of bool `masks [n, N]`, its index tensors on `device` (default: the masks' device).
        Masks on a GPU are read back once here; CAAP builds them on the CPU."""
        device = masks.device if device is None else torch.device(device)
        cpu = masks.detach().to("cpu", torch.bool)
        sets, patches = cpu.nonzero(as_tuple=True)
        offsets = (0, *cpu.sum(1).cumsum(0).tolist()) if cpu.shape[0] else (0,)
        return cls(
            num_sets=int(cpu.shape[0]),
            num_patches=int(cpu.shape[1]),
            sets=sets.to(device, non_blocking=True),
            patches=patches.to(device, non_blocking=True),
            offsets=tuple(int(o) for o in offsets),
            masks=cpu.to(device, non_blocking=True),
        )

    def entry(self, q: int) -> int:
        """Index of the first patched token of run q (of all runs before q: `entry(q)` tokens)."""
        if self.num_sets == 0:
            return 0
        return (q // self.num_sets) * self.offsets[-1] + self.offsets[q % self.num_sets]


class ChunkSize:
    """Patched sequences per pass, halved when a chunk runs out of CUDA memory (`torch.OutOfMemoryError`).

    Shared by the calls of one method, so that a halved size stays halved for the next batches; `oom_from`
    is the first size that ran out of memory (None while none did).
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self.oom_from: int | None = None
        self.reported = True  # whether the last halving was logged (with the size that then worked)

    def halve(self) -> None:
        """After an out-of-memory error at `size`: half of it (the caller re-raises at size 1)."""
        if self.reported:  # a new episode: remember the size that failed first
            self.oom_from = self.size
        self.size = max(1, self.size // 2)
        self.reported = False

    def __int__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ChunkSize({self.size}, oom_from={self.oom_from})"


def _apply(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return fn(x)


@functools.cache
def compiled_apply() -> Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]:
    """`fn(x)` under `torch.compile(dynamic=False)`: the blocks of a model share one graph per input shape
    (timm blocks of one model differ only in their parameters, which dynamo lifts to graph inputs)."""
    return torch.compile(_apply, dynamic=False)


def patched_runs(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    masks: Tensor | PatchLayout,
    start: int,
    writes: Collection[int],
    branches: Collection[int] = (),
    chunk_size: int | ChunkSize = 256,
    head_tokens_only: bool = True,
    pairs: Tensor | None = None,
    compile: bool = False,
) -> Iterator[tuple[int, int, Tensor, dict[int, Tensor]]]:
    """The patched runs of the (image b, patch set w) pairs `q = b * n + w`, in chunks `q0 <= q < q1`; with
    `pairs` `[Q, 2]` (long rows `(b, w)`) only those pairs, run q being `pairs[q]` (the estimators' refinements).

    The trunk starts from the neutral `prefix` `r_start` `[1 or B, T, D]` and writes the source's tokens
    (`states`: position -> `[B, N, D]`) of the patch set `masks[w]` (`[n, N]` bool, or their `PatchLayout`)
    at every position in `writes`. At each position e in `branches` (`e >= start`) a branch leaves the trunk
    before its write at e and finishes without writing; a branch after the last write is the trunk itself
    (not computed twice).

    Yields `(q0, q1, logits [q1 - q0, C], {e: branch logits [q1 - q0, C]})`, logits in float32. With
    `head_tokens_only`, the last block is computed for the prefix tokens only when the head reads only those
    (exact; writes at position L are then skipped, the head never reads them). A chunk that raises
    `torch.OutOfMemoryError` is retried at half the size (`chunk_size` as a `ChunkSize` keeps the halved size
    for the caller); one warning names the size that worked. With `compile`, the blocks run under
    `torch.compile` on chunks of one size (the runs split evenly, the last chunk padded with unpatched rows).
    The inputs are checked when called; the loop itself reads nothing back from the device (except for
    `pairs` over sets of unequal sizes: one read-back per chunk).
    """
    layout = masks if isinstance(masks, PatchLayout) else PatchLayout.of(masks, prefix.device)
    missing = sorted(j for j in writes if j not in states)
    if missing:
        raise ValueError(f"source states lack positions {missing} needed by the writes {sorted(writes)}")
    if any(e < start for e in branches):
        raise ValueError(f"branch positions {sorted(branches)} must be >= start={start}")
    source = states[min(writes)] if writes else None  # [B, N, D]
    batch, nb = prefix.shape[0] if source is None else source.shape[0], prefix.shape[0]
    if source is not None and layout.num_patches != source.shape[1]:
        raise ValueError(f"masks cover {layout.num_patches} patches but the source has {source.shape[1]}")
    if nb not in (1, batch):
        raise ValueError(f"neutral prefix has batch {nb}; expected 1 or the source batch {batch}")
    chunk = chunk_size if isinstance(chunk_size, ChunkSize) else ChunkSize(chunk_size)
    if pairs is not None:
        pairs = pairs.to(prefix.device, non_blocking=True)
    return _chunk_loop(
        model, states, prefix, layout, start, writes, branches, chunk, head_tokens_only, compile, batch, pairs
    )


def _chunk_loop(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    layout: PatchLayout,
    start: int,
    writes: Collection[int],
    branches: Collection[int],
    chunk: ChunkSize,
    head_tokens_only: bool,
    compile: bool,
    batch: int,
    pairs: Tensor | None,
) -> Iterator[tuple[int, int, Tensor, dict[int, Tensor]]]:
    """`patched_runs`' loop over chunks: sizes and token indices are host integers or device arithmetic."""
    depth, p, n, nb = model.depth, model.num_prefix_tokens, layout.num_sets, prefix.shape[0]
    last_block = prefix_only_last_block(model) if head_tokens_only and depth > start else None
    write_at = {j for j in writes if not (last_block is not None and j == depth)}
    split_at = {e for e in branches if e <= max(write_at, default=-1)}
    apply = compiled_apply() if compile else _apply
    device, tokens, set_size = prefix.device, layout.offsets[-1], layout.set_size
    total = batch * n if pairs is None else int(pairs.shape[0])

    def block(j: int, x: Tensor) -> Tensor:
        return apply(last_block if last_block is not None and j == depth - 1 else model.blocks[j], x)

    def finish(x: Tensor, j: int) -> Tensor:  # blocks j..L-1 without writing, then the head
        for i in range(j, depth):
            x = block(i, x)
        return model.head(x).float()

    def run(q0: int, q1: int, width: int) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits of the runs q0..q1-1 in a chunk of `width >= q1 - q0` rows (the rest unpatched padding)."""
        m = q1 - q0
        if pairs is None:
            image = torch.arange(q0, q0 + width, device=device).clamp_(max=total - 1) // n
        else:
            image = torch.cat([pairs[q0:q1, 0], pairs.new_zeros(width - m)])
        x = prefix.index_select(0, image if nb > 1 else torch.zeros(width, dtype=torch.long, device=device))
        # the chunk's patched tokens: rows (in the chunk), source images and patches, [M] each
        if pairs is None:
            e0, e1 = layout.entry(q0), layout.entry(q1)
            e = torch.arange(e0, e1, device=device)
            src_b, within = e // max(1, tokens), e % max(1, tokens)
            rows, patch = src_b * n + layout.sets[within] - q0, layout.patches[within]
            some = e1 > e0
        elif (
            set_size is not None
        ):  # sets of one size c: run r's tokens are entries w_r * c .. w_r * c + c - 1
            rows = torch.arange(m, device=device).repeat_interleave(set_size)
            within = pairs[q0:q1, 1][rows] * set_size + torch.arange(set_size, device=device).repeat(m)
            src_b, patch = pairs[q0:q1, 0][rows], layout.patches[within]
            some = m * set_size > 0
        else:
            rows, patch = layout.masks[pairs[q0:q1, 1]].nonzero(as_tuple=True)  # reads the count back
            src_b = pairs[q0:q1, 0][rows]
            some = rows.numel() > 0
        tok = patch + p
        split: dict[int, Tensor] = {}
        for j in range(start, depth + 1):
            if j in split_at:
                split[j] = finish(x, j)  # x is not modified by the branch
            if j in write_at and some:
                x.index_put_((rows, tok), states[j][src_b, patch].to(x.dtype))
            if j < depth:
                x = block(j, x)
        return model.head(x).float(), split

    q0 = 0
    while q0 < total:
        size = chunk.size
        if compile:  # chunks of one width (the fewest of at most `chunk.size`): one graph per chunk shape
            size = math.ceil(total / math.ceil(total / size))
        q1 = min(total, q0 + size)
        width = size if compile else q1 - q0
        try:
            logits, split = run(q0, q1, width)
        except torch.OutOfMemoryError:
            if chunk.size <= 1:
                raise
            chunk.halve()  # leaving the handler frees the failed chunk's tensors before the retry
            continue
        if not chunk.reported:
            log.warning(
                "CAAP engine: CUDA out of memory with %d patched sequences per pass; continuing with %d",
                chunk.oom_from, chunk.size,
            )  # fmt: skip
            chunk.reported = True
        if width > q1 - q0:  # drop the padding rows
            logits, split = logits[: q1 - q0], {e: v[: q1 - q0] for e, v in split.items()}
        yield q0, q1, logits, {e: split.get(e, logits) for e in branches}
        q0 = q1


def range_scores(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    targets: Tensor,
    masks: Tensor | PatchLayout,
    start: int,
    stops: Sequence[int],
    mode: str = "hold",
    score: Score = "logit",
    chunk_size: int | ChunkSize = 256,
    neutral_logits: Tensor | None = None,
    head_tokens_only: bool = True,
    pairs: Tensor | None = None,
    compile: bool = False,
) -> dict[int, Tensor]:
    """Scores `{stop: [B, K, n]}` of the patched runs of the ranges `(start, stop)`, `stop` in `stops`; with
    `pairs` `[Q, 2]` (rows `(image b, patch set w)`, see `patched_runs`) the scores `{stop: [Q, K]}` of those
    runs only.

    Hold mode: one trunk writes through `max(stops) - 1` and branches at every other stop (about half the
    block passes of running each range on its own). Inject mode writes at `start` only, so every stop gives
    the same runs, computed once. Arguments as in `patched_scores`, with `targets` `[B, K]`.
    """
    check_choice("mode", mode, MODES)
    check_score(score)
    layout = masks if isinstance(masks, PatchLayout) else PatchLayout.of(masks, prefix.device)
    targets = targets.to(prefix.device)
    batch, k = targets.shape
    n = layout.num_sets
    hold = mode == "hold"
    writes = patch_positions(start, max(stops), mode) if hold else [start]
    neutral_t = None
    if score == "delta":
        if neutral_logits is None:
            neutral_logits = unpatched_logits(model, prefix, start)
        nl = neutral_logits.float()
        neutral_t = (nl if nl.shape[0] == batch else nl.expand(batch, -1)).gather(1, targets)  # [B, K]
    if pairs is not None:
        pairs = pairs.to(prefix.device, non_blocking=True)
    total = batch * n if pairs is None else int(pairs.shape[0])
    out = {e: torch.empty(total, k, dtype=torch.float32, device=prefix.device) for e in stops}
    runs = patched_runs(
        model, states, prefix, layout, start, writes, stops if hold else (), chunk_size, head_tokens_only,
        pairs, compile,
    )  # fmt: skip
    for q0, q1, logits, branched in runs:
        b = torch.arange(q0, q1, device=prefix.device) // n if pairs is None else pairs[q0:q1, 0]
        nt = None if neutral_t is None else neutral_t[b]
        scored: dict[int, Tensor] = {}  # by id(logits): a branch after the last write is the trunk
        for e in stops:
            lg = branched.get(e, logits)
            if id(lg) not in scored:
                scored[id(lg)] = target_score(lg, targets[b], score, model.multilabel, nt)
            out[e][q0:q1] = scored[id(lg)]
    if pairs is not None:
        return out
    return {e: v.view(batch, n, k).permute(0, 2, 1) for e, v in out.items()}


def patched_scores(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    target: Tensor,
    masks: Tensor | PatchLayout,
    start: int,
    stop: int,
    mode: str = "hold",
    score: Score = "logit",
    chunk_size: int | ChunkSize = 256,
    neutral_logits: Tensor | None = None,
    head_tokens_only: bool = True,
    compile: bool = False,
) -> Tensor:
    """Scores `[B, n]` of the patched runs: one per source image and patch set (row of `masks`); with targets
    `[B, K]` (K classes per image, all read from the same patched runs) the scores are `[B, K, n]`.

    Args:
        states: `source_states(model, images, patch_positions(start, stop, mode))`: position -> `[B, N, D]`.
        prefix: the neutral `r_start` `[1 or B, T, D]` (`neutral_prefix`).
        target: target classes `[B]` or `[B, K]` (long).
        masks: `[n, N]` bool patch sets; row w is patched together (all False = the unpatched neutral run,
            all True = every patch token); or their `PatchLayout`.
        start, stop: resolved layer range (`resolve_layer_range`), positions `range(start, stop)`.
        mode: `hold` (write at every position of the range) or `inject` (at `start` only).
        score: a `caap.scores.Score`: `logit`, `prob` (softmax, or sigmoid for a multi-label model),
            `logprob`, or `delta` (patched logit minus the unpatched neutral logit).
        chunk_size: patched sequences per pass (a `ChunkSize` keeps a size halved after running out of memory).
        neutral_logits: `[1 or B, C]` unpatched neutral logits, computed when needed and not given.
        head_tokens_only: compute the last block for prefix tokens only when the head reads only those.
        compile: run the blocks under `torch.compile` (equal, padded chunks).
    """
    targets = target if target.ndim == 2 else target[:, None]
    out = range_scores(
        model, states, prefix, targets, masks, start, [stop], mode, score, chunk_size, neutral_logits,
        head_tokens_only, compile=compile,
    )[stop]  # fmt: skip
    return out if target.ndim == 2 else out[:, 0]


def patched_logits(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    masks: Tensor | PatchLayout,
    start: int,
    stop: int,
    mode: str = "hold",
    chunk_size: int | ChunkSize = 256,
    head_tokens_only: bool = True,
    compile: bool = False,
) -> Tensor:
    """All logits `[B, n, C]` of the patched runs (same arguments as `patched_scores`); for tests and analysis."""
    layout = masks if isinstance(masks, PatchLayout) else PatchLayout.of(masks, prefix.device)
    writes = patch_positions(start, stop, mode)
    batch = next(iter(states.values())).shape[0]
    runs = patched_runs(
        model, states, prefix, layout, start, writes, (), chunk_size, head_tokens_only, compile=compile
    )
    return torch.cat([logits for _, _, logits, _ in runs]).view(batch, layout.num_sets, -1)
