"""CAAP — Causal Attribution via Activation Patching (Izadi et al., arXiv 2603.13652).

For each patch i of the source image, the neutral context is rerun from residual position `start` to the head,
and token i of its stream is overwritten with the source's `r_j[i]` at every position j of the layer range
(`mode="hold"`) or at `start` only (`mode="inject"`, the token then evolves); everything else (CLS, registers,
the other patches) evolves in the neutral context. The target-class score of that patched run is patch i's
attribution; the map `[B, gh, gw]` is the patch scores on the token grid.

The paper leaves the layer range to the user, so CAAP also maps many ranges at once (`range_maps`, shared work
through `caap.methods.patching`), which `layers=auto` uses to choose one. The batched engine is
`caap.methods.patching`; the neutral contexts are reference images (`caap.references`). `estimator` trades
exactness for fewer patched runs (`caap.methods.caap_estimators`); `cost` counts the work done.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from caap.methods.base import AttributionMethod
from caap.methods.caap_estimators import (
    ESTIMATORS,
    EstimatorCost,
    PatchingContext,
    adaptive_scores,
    gradient_scores,
    screened_scores,
)
from caap.methods.option_checks import check_choice, check_fraction, check_positive_int
from caap.methods.patching import (
    MODES,
    ChunkSize,
    compute_dtype,
    group_rows_by_image,
    neutral_states,
    patch_positions,
    resolve_chunk_size,
    source_states,
    window_masks,
)
from caap.models.layers import all_layer_ranges, resolve_layer_range
from caap.models.vit import ViTClassifier
from caap.references import ReferenceImage, build_reference
from caap.scores import Score, check_score


def _param_signature(model: nn.Module) -> tuple[int, int]:
    """Changes when the weights change in place (optimizer steps, load_state_dict) or are replaced."""
    params = list(model.parameters())
    return (sum(p._version for p in params), params[0].data_ptr() if params else 0)


class CAAP(AttributionMethod):
    """Causal Attribution via Activation Patching (arXiv 2603.13652): maps `[B, gh, gw]` of patched-run scores.

    Args:
        start: first residual position of the layer range (`layers.start`; 0..L, negatives from the end).
        stop: one past the last position (`layers.stop`; None = through L), Python slice semantics.
        mode: `hold` (source token written at every position of the range) or `inject` (at `start` only;
            `stop` is then validated but unused).
        score: `logit` (target logit), `prob`, `logprob`, or `delta` (patched minus unpatched neutral logit).
        window: k for k x k non-overlapping patch windows patched together (edge windows smaller); every
            patch of a window gets the window's score, the map stays at patch resolution.
        neutral: the neutral context, a `ReferenceImage`, a kind name, or a mapping `{kind: ..., **options}`
            (see `caap.references`); noise with `num_samples > 1` averages the maps over samples.
        chunk_size: patched sequences per pass; None derives it from `memory_budget_mb`.
        memory_budget_mb: activation budget for a chunk (see `caap.models.memory.estimate_sequence_bytes`);
            None = half the free GPU memory, or 64 MB on the CPU. Give at most one of `chunk_size`,
            `memory_budget_mb`.
        head_tokens_only: when the head reads only prefix tokens (CLS pooling), compute the last block for
            those tokens only (exact; a speed option).
        estimator: `exact` (one patched run per patch set), `gradient` (first-order estimate from one forward
            and one backward of the neutral run per class), `adaptive` (exact k x k windows, refined patch by
            patch where the effect is largest) or `screened` (exact runs for the largest estimated effects,
            the gradient estimate elsewhere); see `caap.methods.caap_estimators`.
        adaptive_window: `adaptive`'s window size k (needs `window=1`).
        adaptive_refine: `adaptive`'s share of windows rerun patch by patch, in [0, 1].
        screen_fraction: `screened`'s share of patch sets run exactly, in [0, 1].
        compile: run the blocks of the patched runs under `torch.compile` (`dynamic=False`, chunks of one
            size, the last padded); equal to the eager maps up to float rounding; each new chunk shape
            compiles once.

    `cost` (an `EstimatorCost`) cumulates the work of every call in forward-pass equivalents (`reset_cost`).
    A chunk that runs out of CUDA memory is halved and retried; the halved size is kept for later batches.
    """

    requires_grad = False
    name = "caap"

    def __init__(
        self,
        start: int = 2,
        stop: int | None = None,
        mode: str = "hold",
        score: Score = "logit",
        window: int = 1,
        neutral: ReferenceImage | str | Mapping[str, Any] | None = "black",
        chunk_size: int | None = None,
        memory_budget_mb: float | None = None,
        head_tokens_only: bool = True,
        estimator: str = "exact",
        adaptive_window: int = 2,
        adaptive_refine: float = 0.25,
        screen_fraction: float = 0.1,
        compile: bool = False,
    ) -> None:
        self.start = start
        self.stop = stop
        self.mode = check_choice("mode", mode, MODES)
        self.score: Score = check_score(score)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an integer >= 1 (k x k patch windows)")
        self.window = window
        if chunk_size is not None and memory_budget_mb is not None:
            raise ValueError(
                f"give at most one of chunk_size={chunk_size!r} and memory_budget_mb={memory_budget_mb!r}"
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1 or null")
        if memory_budget_mb is not None and not float(memory_budget_mb) > 0:
            raise ValueError(f"memory_budget_mb={memory_budget_mb!r} must be > 0 or null")
        self.chunk_size = chunk_size
        self.memory_budget_mb = memory_budget_mb
        self.head_tokens_only = bool(head_tokens_only)
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.adaptive_window = check_positive_int("adaptive_window", adaptive_window)
        self.adaptive_refine = check_fraction("adaptive_refine", adaptive_refine)
        self.screen_fraction = check_fraction("screen_fraction", screen_fraction)
        if self.estimator == "adaptive" and window != 1:
            raise ValueError(
                f"method.estimator=adaptive refines windows down to single patches and needs method.window=1, "
                f"got window={window!r}; the window size of adaptive is method.adaptive_window"
            )
        self.cost = EstimatorCost()
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be true or false")
        self.compile = compile
        # the largest chunk that fitted after a CUDA out-of-memory error (None: no error yet)
        self._chunk_cap: int | None = None
        self.neutral = build_reference(neutral)
        # (weak reference to the model, key, per neutral sample {start: r_start [1, T, D]}, logits [S, 1, C])
        self._cache: tuple[weakref.ref, Hashable, list[dict[int, Tensor]], Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the neutral-prefix cache (it holds a weak reference and device tensors)."""
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"CAAP(start={self.start}, stop={self.stop}, mode={self.mode!r}, score={self.score!r}, "
            f"window={self.window}, neutral={self.neutral!r}, chunk_size={self.chunk_size}, "
            f"memory_budget_mb={self.memory_budget_mb}, estimator={self.estimator!r}, compile={self.compile})"
        )

    def reset_cost(self) -> None:
        """Start counting `cost` from zero."""
        self.cost = EstimatorCost()

    def layer_range(self, model: ViTClassifier) -> tuple[int, int]:
        """The resolved positions `(start, stop)` for this model (raises a clear ValueError when invalid)."""
        return resolve_layer_range(self.start, self.stop, model.depth, model.name)

    def setup(self, model: ViTClassifier) -> None:
        """Validate the layer range against the model before any data is loaded."""
        self.layer_range(model)

    def prepare(self, data: Any, max_images: int | None = None) -> None:
        """Let the neutral context compute statistics from data (`dataset_mean`); a no-op otherwise."""
        self.neutral.prepare(data, max_images)

    # -- layer-range selection ----------------------------------------------------------------------------
    def layer_ranges(self, model: ViTClassifier) -> list[tuple[int, int]]:
        """Every valid range `(start, stop)` of residual positions of `model` (`all_layer_ranges`)."""
        return all_layer_ranges(model.depth)

    def use_layer_range(self, start: int, stop: int | None) -> None:
        """Map at the range `(start, stop)` from now on (`layers=auto`'s choice)."""
        self.start, self.stop = start, stop

    def chunk_for(self, model: ViTClassifier, images: Tensor) -> int:
        """The chunk size (patched sequences per pass) used for these images: from `chunk_size` or the memory
        budget, at most the size that fitted after an out-of-memory error."""
        gh, gw = model.grid_size(images)
        chunk = resolve_chunk_size(
            model,
            gh * gw + model.num_prefix_tokens,
            self.chunk_size,
            self.memory_budget_mb,
            images.device,
            compute_dtype(model, images.device),
        )
        return chunk if self._chunk_cap is None else min(chunk, self._chunk_cap)

    def _neutral(
        self, model: ViTClassifier, images: Tensor, starts: Sequence[int]
    ) -> tuple[list[dict[int, Tensor]], Tensor]:
        """Per neutral sample `{start: r_start [1 or B, T, D]}` and unpatched logits `[S, 1 or B, C]`; cached
        across batches when the neutral context does not depend on the image."""
        device = images.device
        key: Hashable | None = None
        if not self.neutral.depends_on_image:
            autocast = torch.is_autocast_enabled(device.type)
            key = (
                _param_signature(model),
                str(device),
                images.dtype,
                tuple(images.shape[-2:]),
                autocast,
                torch.get_autocast_dtype(device.type) if autocast else None,
                tuple(starts),
                self.neutral.cache_key(),
            )
            cache = self._cache
            if cache is not None and cache[0]() is model and cache[1] == key:
                return cache[2], cache[3]
        passes = [neutral_states(model, imgs, starts) for imgs in self.neutral.images(images, model)]
        prefixes, logits = [p for p, _ in passes], torch.stack([lg for _, lg in passes])
        self.cost.add_blocks(sum(lg.shape[0] for lg in logits), model.depth, model.depth)
        if key is not None:
            self._cache = (weakref.ref(model), key, prefixes, logits)
        return prefixes, logits

    def range_maps(
        self,
        model: ViTClassifier,
        images: Tensor,
        target: Tensor,
        ranges: Sequence[tuple[int, int]],
    ) -> Iterator[tuple[tuple[int, int], Tensor]]:
        """CAAP maps `[B, gh, gw]` of `images [B, 3, H, W]` for `target [B]`, for each resolved range, from the
        configured `estimator`.

        Equals `attribute` at each range. Shared between ranges: one source pass, one neutral pass, and (exact)
        the patched runs of ranges with one start up to where they differ (`caap.methods.patching.range_scores`)
        or (gradient) one backward pass. Rows that repeat an image (one row per present class under
        `target=label`) share its patched runs. Yields as each start is done: by start, then stop (the order of
        `all_layer_ranges`).
        """
        yield from self._range_maps(model, images, target, ranges, self.estimator)

    def estimated_range_maps(
        self,
        model: ViTClassifier,
        images: Tensor,
        target: Tensor,
        ranges: Sequence[tuple[int, int]],
    ) -> Iterator[tuple[tuple[int, int], Tensor]]:
        """`gradient`-estimated maps `[B, gh, gw]` for each range (as `range_maps`), whatever `estimator` is:
        one source pass and one backward pass for all ranges (`layers.screen_top_k` screens ranges with them)."""
        yield from self._range_maps(model, images, target, ranges, "gradient")

    def _range_maps(
        self,
        model: ViTClassifier,
        images: Tensor,
        target: Tensor,
        ranges: Sequence[tuple[int, int]],
        estimator: str,
    ) -> Iterator[tuple[tuple[int, int], Tensor]]:
        gh, gw = model.grid_size(images)
        masks, index = window_masks(gh, gw, self.window)  # on the CPU: the engine reads them without a sync
        index = index.to(images.device, non_blocking=True)
        starts = sorted({s for s, _ in ranges})
        with torch.no_grad():
            unique, targets, inverse, slot = group_rows_by_image(images, target)
            positions = {j for s, e in ranges for j in patch_positions(s, e, self.mode)}
            states = source_states(model, unique, positions)
            prefixes, logits = self._neutral(model, unique, starts)
            chunk = ChunkSize(self.chunk_for(model, unique))  # halved on CUDA out-of-memory errors
        self.cost.add_blocks(unique.shape[0], max(positions), model.depth)
        ctx = PatchingContext(
            model=model, states=states, prefixes=prefixes, neutral_logits=logits, targets=targets,
            mode=self.mode, score=self.score, chunk_size=chunk, head_tokens_only=self.head_tokens_only,
            cost=self.cost, compile=self.compile,
        )  # fmt: skip

        def to_maps(scores: Tensor, spread: Tensor | None = index) -> Tensor:  # [U, K, n or N] -> [B, gh, gw]
            rows = scores[inverse, slot]
            return (rows if spread is None else rows[:, spread]).view(images.shape[0], gh, gw)

        try:
            # yield as each start is done (progress bars move), outside no_grad (it must not leak into the consumer)
            by_start = [(s, sorted({e for s2, e in ranges if s2 == s})) for s in starts]
            if estimator == "gradient":
                estimates = gradient_scores(ctx, masks, [(s, e) for s, stops in by_start for e in stops])
                for r, scores in estimates.items():
                    yield r, to_maps(scores)
                return
            for start, stops in by_start:
                if estimator == "exact":
                    total = ctx.exact(masks, start, stops)
                    for e in stops:
                        yield (start, e), to_maps(total[e])
                elif estimator == "screened":
                    for e in stops:
                        yield (start, e), to_maps(screened_scores(ctx, masks, start, e, self.screen_fraction))
                else:
                    for e in stops:
                        scores = adaptive_scores(
                            ctx, (gh, gw), start, e, self.adaptive_window, self.adaptive_refine
                        )
                        yield (start, e), to_maps(scores, None)
        finally:  # later batches start at the size that fitted
            if chunk.oom_from is not None:
                self._chunk_cap = chunk.size

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        """CAAP maps `[B, gh, gw]` for pixel-space images `[B, 3, H, W]` and target classes `[B]`."""
        ((_, maps),) = self.range_maps(model, images, target, [self.layer_range(model)])
        return maps
