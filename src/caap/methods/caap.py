"""CAAP — Causal Attribution via Activation Patching (Izadi et al., arXiv 2603.13652), as DESIGN.md defines it.

For each patch i of the source image, the neutral context is rerun from residual position `start` to the head,
and token i of its stream is overwritten with the source's `r_j[i]` at every position j of the layer range
(`mode="hold"`) or at `start` only (`mode="inject"`, the token then evolves); everything else (CLS, registers,
the other patches) evolves in the neutral context. The target-class score of that patched run is patch i's
attribution; the map `[B, gh, gw]` is the patch scores on the token grid.

The engine is batched: one source pass caches only the patch tokens of the positions the range needs; the
neutral prefix `r_0..r_start` is computed once per batch, or once for the whole run when the neutral context
does not depend on the image; the patched runs of (images x patch windows) go through the remaining blocks in
chunks, the source tokens written with index ops (no Python loop over patches). When the head reads only
prefix tokens (`global_pool='token'`, also DeiT's distilled head), the last block is computed for the prefix
tokens' queries only (exact: the head never reads the patch tokens of `r_L`).

Public pieces: `CAAP` (the `AttributionMethod`), and the engine functions `source_states`, `neutral_prefix`,
`patched_logits`, `patched_scores`, `window_masks`, `estimate_sequence_bytes`, `resolve_chunk_size`, which
take an explicit boolean patch-set mask `[n, N]` so that "no patch" and "all patches" can be tested.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from caap.methods.base import AttributionMethod
from caap.models.layers import resolve_layer_range
from caap.models.vit import ViTClassifier
from caap.references import ReferenceImage as NeutralContext
from caap.references import build_reference as build_neutral

MODES = ("hold", "inject")
SCORES = ("logit", "prob", "logprob", "delta")

#: Activation memory of one sequence in one block, in units of T * D elements: residual stream, norm output,
#: q/k/v (3), attention output, projection, and the MLP hidden + activation (2 * mlp_ratio) -> 4 + 2 * 4.
#: Attention scores (heads * T * T) are added separately (twice without fused attention: scores, softmax).
_BASE_FACTOR = 4.0
_DEFAULT_CPU_BUDGET_MB = (
    64.0  # cache-sized chunks are fastest on CPU (measured: 128 seqs > 574 seqs for FashionGrid)
)
_CUDA_FREE_FRACTION = 0.5
_MAX_CHUNK = 8192


# -- small helpers ------------------------------------------------------------------------------------------
def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def patch_positions(start: int, stop: int, mode: str) -> list[int]:
    """The residual positions where the source tokens are written: `range(start, stop)` (hold) or `[start]`."""
    _check_choice("mode", mode, MODES)
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


def _cast_images(model: ViTClassifier, images: Tensor) -> Tensor:
    """Match a model held in a low-precision dtype (without autocast the patch embedding needs it)."""
    weight = model.patch_embed.proj.weight
    if (
        images.is_floating_point()
        and images.dtype != weight.dtype
        and not torch.is_autocast_enabled(images.device.type)
    ):
        return images.to(weight.dtype)
    return images


def head_reads_prefix_only(model: ViTClassifier) -> bool:
    """Whether the classifier head reads only prefix tokens of `r_L` (timm `global_pool='token'`)."""
    vit = model.model
    return (
        type(vit) in (VisionTransformer, VisionTransformerDistilled)
        and vit.global_pool == "token"
        and model.pooling in ("token", "distilled")  # not DINOv2's CLS + mean patch head
        and getattr(vit, "attn_pool", None) is None
        and model.num_prefix_tokens >= (2 if isinstance(vit, VisionTransformerDistilled) else 1)
    )


def _prefix_only_supported(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (
        type(block) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and not block.training
    )


def _prefix_only_block(block: Block, x: Tensor, num_prefix: int) -> Tensor:
    """timm `Block` on `x` `[c, T, D]` computing outputs for the first `num_prefix` tokens only: `[c, P, D]`.

    Keys and values come from all tokens; queries, projection and MLP only from the prefix tokens. Equals
    `block(x)[:, :num_prefix]` up to float rounding.
    """
    attn: Attention = block.attn
    c, t, _ = x.shape
    a, heads, hd = attn.attn_dim, attn.num_heads, attn.head_dim
    h = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :num_prefix], weight[:a], None if bias is None else bias[:a])
    kv = F.linear(h, weight[a:], None if bias is None else bias[a:])
    q = q.reshape(c, num_prefix, heads, hd).transpose(1, 2)
    k, v = kv.reshape(c, t, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = o.transpose(1, 2).reshape(c, num_prefix, a)
    o = attn.proj_drop(attn.proj(attn.norm(o)))
    y = x[:, :num_prefix] + block.drop_path1(block.ls1(o))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


# -- memory ---------------------------------------------------------------------------------------------------
def _compute_dtype(model: ViTClassifier, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.patch_embed.proj.weight.dtype


def estimate_sequence_bytes(model: ViTClassifier, num_tokens: int, dtype: torch.dtype | None = None) -> int:
    """Estimated peak activation bytes of one patched sequence in one block (the engine's chunk unit).

    `T * D * bytes * factor + heads * T * T * bytes * (1 if fused else 2)`, with `factor = 4 + 2 * mlp_ratio`
    (residual stream, norm output, q/k/v, attention output and projection, MLP hidden and activation;
    12 for the usual mlp_ratio 4) and the attention-score matrices (scores and softmax without fused
    attention). Under no_grad each block's intermediates are freed before the next, so this is per chunk.
    """
    vit = model.model
    d = int(vit.embed_dim)
    block = vit.blocks[0]
    attn = getattr(block, "attn", None)
    heads = int(getattr(attn, "num_heads", max(1, d // 64)))
    fused = bool(getattr(attn, "fused_attn", False))
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    mlp_ratio = fc1.out_features / d if isinstance(fc1, nn.Linear) else 4.0
    nbytes = torch.empty((), dtype=dtype or model.patch_embed.proj.weight.dtype).element_size()
    factor = _BASE_FACTOR + 2.0 * mlp_ratio
    t = int(num_tokens)
    return int(t * d * nbytes * factor + heads * t * t * nbytes * (1 if fused else 2))


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


# -- the engine ---------------------------------------------------------------------------------------------
def source_states(model: ViTClassifier, images: Tensor, positions: Sequence[int]) -> dict[int, Tensor]:
    """One source pass: the patch tokens `r_j[:, P:]` `[B, N, D]` for each position j in `positions` (0..L).

    Only the blocks up to `max(positions) - 1` run; nothing else is kept.
    """
    wanted = set(positions)
    if not wanted:
        return {}
    p = model.num_prefix_tokens
    x = model.embed(_cast_images(model, images))
    states: dict[int, Tensor] = {}
    if 0 in wanted:
        states[0] = x[:, p:]
    for j in range(max(wanted)):
        x = model.blocks[j](x)
        if j + 1 in wanted:
            states[j + 1] = x[:, p:]
    return states


def neutral_prefix(model: ViTClassifier, neutral_images: Tensor, start: int) -> Tensor:
    """The neutral residual `r_start` `[Bn, T, D]` for pixel-space neutral images `[Bn, 3, H, W]`."""
    return model.forward_blocks(model.embed(_cast_images(model, neutral_images)), 0, start)


def unpatched_logits(model: ViTClassifier, prefix: Tensor, start: int) -> Tensor:
    """Unpatched neutral logits `[Bn, C]` from the neutral `r_start` `[Bn, T, D]`."""
    return model.head(model.forward_blocks(prefix, start)).float()


def _patched_chunks(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    masks: Tensor,
    start: int,
    stop: int,
    mode: str,
    chunk_size: int,
    head_tokens_only: bool,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield `(q0, q1, logits [q1 - q0, C])` for the (image b, window w) pairs `q = b * n + w` in chunks."""
    positions = patch_positions(start, stop, mode)
    missing = [j for j in positions if j not in states]
    if missing:
        raise ValueError(
            f"source states lack positions {missing} needed by mode={mode!r}, range({start}, {stop})"
        )
    depth = model.depth
    batch = states[positions[0]].shape[0]
    n, num_patches = masks.shape
    if states[positions[0]].shape[1] != num_patches:
        raise ValueError(
            f"masks cover {num_patches} patches but the source has {states[positions[0]].shape[1]}"
        )
    nb = prefix.shape[0]
    if nb not in (1, batch):
        raise ValueError(f"neutral prefix has batch {nb}; expected 1 or the source batch {batch}")
    p = model.num_prefix_tokens
    fast = head_tokens_only and depth > start and head_reads_prefix_only(model)
    fast = fast and _prefix_only_supported(model.blocks[depth - 1])
    write_at = {j for j in positions if not (fast and j == depth)}
    device = prefix.device
    masks = masks.to(device)
    total = batch * n
    for q0 in range(0, total, max(1, int(chunk_size))):
        q1 = min(total, q0 + int(chunk_size))
        q = torch.arange(q0, q1, device=device)
        b, w = q // n, q % n
        rows, patch = masks[w].nonzero(as_tuple=True)  # the chunk's patched tokens, [M] each
        src_b, tok = b[rows], patch + p
        x = prefix.index_select(0, b if nb > 1 else torch.zeros_like(b))
        for j in range(start, depth + 1):
            if j in write_at and rows.numel():
                x.index_put_((rows, tok), states[j][src_b, patch].to(x.dtype))
            if j < depth:
                block = model.blocks[j]
                x = _prefix_only_block(block, x, p) if fast and j == depth - 1 else block(x)
        yield q0, q1, model.head(x).float()


def _score(
    logits: Tensor, target: Tensor, score: str, multilabel: bool, neutral_target_logit: Tensor | None
) -> Tensor:
    """Scores `[c, K]` of logits `[c, C]` for K target classes per row `[c, K]`."""
    t = logits.gather(1, target)
    if score == "logit":
        return t
    if score == "delta":
        if neutral_target_logit is None:
            raise ValueError("score='delta' needs the unpatched neutral logits")
        return t - neutral_target_logit
    if score == "prob":
        return t.sigmoid() if multilabel else logits.softmax(-1).gather(1, target)
    if score == "logprob":
        return F.logsigmoid(t) if multilabel else logits.log_softmax(-1).gather(1, target)
    raise ValueError(f"score={score!r} is not supported; allowed: {list(SCORES)}")


def patched_scores(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    target: Tensor,
    masks: Tensor,
    start: int,
    stop: int,
    mode: str = "hold",
    score: str = "logit",
    chunk_size: int = 256,
    neutral_logits: Tensor | None = None,
    head_tokens_only: bool = True,
) -> Tensor:
    """Scores `[B, n]` of the patched runs: one per source image and patch set (row of `masks`); with targets
    `[B, K]` (K classes per image, all read from the same patched runs) the scores are `[B, K, n]`.

    Args:
        states: `source_states(model, images, patch_positions(start, stop, mode))`: position -> `[B, N, D]`.
        prefix: the neutral `r_start` `[1 or B, T, D]` (`neutral_prefix`).
        target: target classes `[B]` or `[B, K]` (long).
        masks: `[n, N]` bool patch sets; row w is patched together (all False = the unpatched neutral run,
            all True = every patch token).
        start, stop: resolved layer range (`resolve_layer_range`), positions `range(start, stop)`.
        mode: `hold` (write at every position of the range) or `inject` (at `start` only).
        score: `logit`, `prob` (softmax, or sigmoid for a multi-label model), `logprob`, or `delta` (patched
            logit minus the unpatched neutral logit).
        chunk_size: patched sequences per pass.
        neutral_logits: `[1 or B, C]` unpatched neutral logits, computed when needed and not given.
        head_tokens_only: compute the last block for prefix tokens only when the head reads only those.
    """
    _check_choice("score", score, SCORES)
    targets = (target if target.ndim == 2 else target[:, None]).to(prefix.device)  # [B, K]
    batch, k = targets.shape
    n = masks.shape[0]
    neutral_t = None
    if score == "delta":
        if neutral_logits is None:
            neutral_logits = unpatched_logits(model, prefix, start)
        nl = neutral_logits.float()
        neutral_t = (nl if nl.shape[0] == batch else nl.expand(batch, -1)).gather(1, targets)  # [B, K]
    out = torch.empty(batch * n, k, dtype=torch.float32, device=prefix.device)
    for q0, q1, logits in _patched_chunks(
        model, states, prefix, masks, start, stop, mode, chunk_size, head_tokens_only
    ):
        b = torch.arange(q0, q1, device=prefix.device) // n
        out[q0:q1] = _score(
            logits, targets[b], score, model.multilabel, None if neutral_t is None else neutral_t[b]
        )
    out = out.view(batch, n, k).permute(0, 2, 1)  # [B, K, n]
    return out if target.ndim == 2 else out[:, 0]


def patched_logits(
    model: ViTClassifier,
    states: Mapping[int, Tensor],
    prefix: Tensor,
    masks: Tensor,
    start: int,
    stop: int,
    mode: str = "hold",
    chunk_size: int = 256,
    head_tokens_only: bool = True,
) -> Tensor:
    """All logits `[B, n, C]` of the patched runs (same arguments as `patched_scores`); for tests and analysis."""
    batch = next(iter(states.values())).shape[0]
    n = masks.shape[0]
    parts = [
        logits
        for _, _, logits in _patched_chunks(
            model, states, prefix, masks, start, stop, mode, chunk_size, head_tokens_only
        )
    ]
    return torch.cat(parts).view(batch, n, -1)


# -- the method ---------------------------------------------------------------------------------------------
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
        neutral: a `NeutralContext`, a kind name, or a mapping `{kind: ..., **options}` (see
            `caap.methods.neutral`); noise with `num_samples > 1` averages the maps over samples.
        chunk_size: patched sequences per pass; None derives it from `memory_budget_mb`.
        memory_budget_mb: activation budget for a chunk (see `estimate_sequence_bytes`); None = half the
            free GPU memory, or 64 MB on the CPU. Give at most one of `chunk_size`, `memory_budget_mb`.
        head_tokens_only: when the head reads only prefix tokens (CLS pooling), compute the last block for
            those tokens only (exact; a speed option).
    """

    requires_grad = False
    name = "caap"

    def __init__(
        self,
        start: int = 2,
        stop: int | None = None,
        mode: str = "hold",
        score: str = "logit",
        window: int = 1,
        neutral: NeutralContext | str | Mapping[str, Any] | None = "black",
        chunk_size: int | None = None,
        memory_budget_mb: float | None = None,
        head_tokens_only: bool = True,
    ) -> None:
        self.start = start
        self.stop = stop
        self.mode = _check_choice("mode", mode, MODES)
        self.score = _check_choice("score", score, SCORES)
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
        self.neutral = build_neutral(neutral)
        # (weak reference to the model, key, neutral prefixes [S, 1, T, D], unpatched logits [S, 1, C])
        self._cache: tuple[weakref.ref, Hashable, Tensor, Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the neutral-prefix cache (it holds a weak reference and device tensors)."""
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"CAAP(start={self.start}, stop={self.stop}, mode={self.mode!r}, score={self.score!r}, "
            f"window={self.window}, neutral={self.neutral!r}, chunk_size={self.chunk_size}, "
            f"memory_budget_mb={self.memory_budget_mb})"
        )

    def layer_range(self, model: ViTClassifier) -> tuple[int, int]:
        """The resolved positions `(start, stop)` for this model (raises a clear ValueError when invalid)."""
        return resolve_layer_range(self.start, self.stop, model.depth, model.name)

    def setup(self, model: ViTClassifier) -> None:
        """Validate the layer range against the model before any data is loaded."""
        self.layer_range(model)

    def prepare(self, data: Any, max_images: int | None = None) -> None:
        """Let the neutral context compute statistics from data (`dataset_mean`); a no-op otherwise."""
        self.neutral.prepare(data, max_images)

    def chunk_for(self, model: ViTClassifier, images: Tensor) -> int:
        """The chunk size (patched sequences per pass) used for these images."""
        gh, gw = model.grid_size(images)
        return resolve_chunk_size(
            model,
            gh * gw + model.num_prefix_tokens,
            self.chunk_size,
            self.memory_budget_mb,
            images.device,
            _compute_dtype(model, images.device),
        )

    def _neutral(self, model: ViTClassifier, images: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Neutral prefixes `[S, 1 or B, T, D]` and unpatched logits `[S, 1 or B, C]`, cached when possible."""
        device = images.device
        key: Hashable | None = None
        if not self.neutral.depends_on_image:
            key = (
                _param_signature(model),
                str(device),
                images.dtype,
                tuple(images.shape[-2:]),
                torch.is_autocast_enabled(device.type),
                torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None,
                start,
                self.neutral.cache_key(),
            )
            cache = self._cache
            if cache is not None and cache[0]() is model and cache[1] == key:
                return cache[2], cache[3]
        neutral_images = self.neutral.images(images, model)  # [S, 1 or B, 3, H, W]
        prefixes = torch.stack([neutral_prefix(model, imgs, start) for imgs in neutral_images])
        logits = torch.stack([unpatched_logits(model, prefix, start) for prefix in prefixes])
        if key is not None:
            self._cache = (weakref.ref(model), key, prefixes, logits)
        return prefixes, logits

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        """CAAP maps `[B, gh, gw]` for pixel-space images `[B, 3, H, W]` and target classes `[B]`.

        Rows that repeat an image (one row per present class under `target=label`) share its patched runs:
        the runs are computed once per distinct image and every class is read from the same logits.
        """
        start, stop = self.layer_range(model)
        gh, gw = model.grid_size(images)
        masks, index = window_masks(gh, gw, self.window, images.device)
        with torch.no_grad():
            unique, targets, inverse, slot = group_rows_by_image(images, target)
            states = source_states(model, unique, patch_positions(start, stop, self.mode))
            prefixes, logits = self._neutral(model, unique, start)
            chunk = self.chunk_for(model, unique)
            total: Tensor | None = None
            for prefix, nl in zip(prefixes, logits, strict=True):
                scores = patched_scores(
                    model,
                    states,
                    prefix,
                    targets,
                    masks,
                    start,
                    stop,
                    self.mode,
                    self.score,
                    chunk,
                    nl,
                    self.head_tokens_only,
                )  # [U, K, n]
                total = scores if total is None else total + scores
            assert total is not None
            maps = (total / prefixes.shape[0])[inverse, slot][:, index]
        return maps.view(images.shape[0], gh, gw)


def group_rows_by_image(images: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distinct images and the classes asked of each.

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
