"""CAAP's patched-run engine on an accelerator: out-of-memory halving, no host read-back in the chunk loop, the
bf16 memory estimate, optional `torch.compile`, pinned source images. CPU tests stand in for the GPU (fake
out-of-memory errors, host read-backs forbidden by patching them); `gpu` tests run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import copy
import functools
import logging
import math

import pytest
import torch
from torch import Tensor

from caap.methods.caap import CAAP
from caap.methods.patching import (
    ChunkSize,
    PatchLayout,
    compiled_apply,
    neutral_states,
    patch_positions,
    patched_runs,
    range_scores,
    source_states,
    window_masks,
)
from caap.models import build_model
from caap.models.memory import estimate_sequence_bytes, stream_dtype
from caap.models.vit import ViTClassifier

FG = "vit_fashiongrid_patch7_56"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def fg_model(depth: int = 4) -> ViTClassifier:
    """The FashionGrid layout (56 px, patch 7, 64 patches, CLS head) with larger random weights (contrast)."""
    torch.manual_seed(0)
    model = build_model(FG, kwargs={"depth": depth})
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 1.5 / math.sqrt(mod.in_features))
    return model.eval()


def images(batch: int = 2, seed: int = 1, device: str = "cpu") -> Tensor:
    return torch.rand(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed)).to(device)


# -- out of memory: halve the chunk and retry ----------------------------------------------------------------
def fail_above(block: torch.nn.Module, limit: int, seen: list[int]) -> object:
    """A forward for `block` that raises CUDA's out-of-memory error on chunks of more than `limit` sequences."""
    real = block.forward

    def forward(x: Tensor, *args: object, **kwargs: object) -> Tensor:
        seen.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake: {x.shape[0]} > {limit} sequences)")
        return real(x, *args, **kwargs)

    return forward


def test_out_of_memory_halves_the_chunk_and_keeps_the_maps(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Chunks of 40 fail above 12 sequences: the engine retries the same runs at 20, then 10, logs one warning
    naming 40 and 10, and gives exactly the maps of an un-failed run at 10; the next batch starts at 10."""
    model, x, target = fg_model(), images(), torch.tensor([1, 4])
    want = CAAP(start=2, stop=4, chunk_size=10)(model, x, target)
    want_next = CAAP(start=2, stop=4, chunk_size=10)(model, images(seed=2), target)
    seen: list[int] = []
    monkeypatch.setattr(model.blocks[2], "forward", fail_above(model.blocks[2], 12, seen))
    method = CAAP(start=2, stop=4, chunk_size=40)
    with caplog.at_level(logging.WARNING, logger="caap.methods.patching"):
        got = method(model, x, target)
    assert torch.equal(got, want)
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "40" in warnings[0] and "continuing with 10" in warnings[0], warnings
    assert [s for s in seen if s > 2][:3] == [40, 20, 10]  # same first chunk, halved twice
    seen.clear()
    caplog.clear()
    assert torch.equal(method(model, images(seed=2), target), want_next)
    assert max(seen) == 10 and not caplog.records  # the halved size sticks; no new warning


def test_out_of_memory_at_one_sequence_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    model = fg_model()
    monkeypatch.setattr(model.blocks[2], "forward", fail_above(model.blocks[2], 0, []))
    with pytest.raises(torch.OutOfMemoryError):
        CAAP(start=2, stop=4, chunk_size=4)(model, images(), torch.tensor([1, 4]))


def test_chunk_size_halving_episodes() -> None:
    chunk = ChunkSize(100)
    chunk.halve()
    chunk.halve()
    assert (chunk.size, chunk.oom_from, chunk.reported) == (25, 100, False)
    chunk.reported = True
    chunk.halve()  # a later episode remembers its own first failing size
    assert (chunk.size, chunk.oom_from) == (12, 25)


# -- no host read-back inside the chunk loop -----------------------------------------------------------------
def engine_inputs(model: ViTClassifier, x: Tensor, start: int, stop: int, window: int = 1):
    gh, gw = model.grid_size(x)
    masks, _ = window_masks(gh, gw, window)
    with torch.no_grad():
        states = source_states(model, x, patch_positions(start, stop, "hold"))
        neutral = torch.full((1, 3, *x.shape[-2:]), 0.4, device=x.device)
        prefixes, logits = neutral_states(model, neutral, [start])
    return states, prefixes[start], logits, PatchLayout.of(masks, x.device)


READ_BACKS = ("item", "tolist", "nonzero", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_chunk_loop_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each of these waits for the device (a host-device synchronisation); the loop over chunks of
    `range_scores` (trunk, branches, scores; all runs, or explicit (image, patch) pairs as the estimators ask)
    must call none of them. CPU stand-in for the `gpu` test below."""
    model, x = fg_model(), images()
    start, stops = 1, [3, 5]
    states, prefix, logits, layout = engine_inputs(model, x, start, max(stops), window=2)
    targets = torch.tensor([[1, 2], [3, 3]])
    args = (model, states, prefix, targets, layout, start, stops, "hold", "delta", 5, logits)
    _, _, _, single = engine_inputs(model, x, start, max(stops), window=1)
    pairs = torch.tensor([[0, 5], [1, 63], [0, 0], [1, 5], [1, 17]])  # (image, patch) runs, as the estimators
    pair_args = (
        model,
        states,
        prefix,
        targets,
        single,
        start,
        stops,
        "hold",
        "delta",
        2,
        logits,
        True,
        pairs,
    )
    with torch.no_grad():
        want = range_scores(*args)
        want_pairs = range_scores(*pair_args)
        for name in READ_BACKS:

            def forbidden(*a: object, name: str = name, **k: object) -> None:
                raise AssertionError(f"host read-back {name} inside the chunk loop")

            monkeypatch.setattr(torch.Tensor, name, forbidden)
        monkeypatch.setattr(torch, "nonzero", lambda *a, **k: pytest.fail("torch.nonzero in the loop"))
        got = range_scores(*args)
        got_pairs = range_scores(*pair_args)
        monkeypatch.undo()
        full = range_scores(model, states, prefix, targets, single, start, stops, "hold", "delta", 7, logits)
    for e in stops:
        assert torch.equal(got[e], want[e]) and torch.equal(got_pairs[e], want_pairs[e])
        torch.testing.assert_close(got_pairs[e], full[e][pairs[:, 0], :, pairs[:, 1]])


def test_patch_layout_finds_each_runs_tokens() -> None:
    """Entries entry(q0)..entry(q1) of the layout are the patched tokens of runs q0..q1-1, in mask order."""
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    layout = PatchLayout.of(masks)
    assert layout.offsets == (0, 2, 2, 6) and layout.num_sets == 3 and layout.num_patches == 4
    assert layout.sets.tolist() == [0, 0, 2, 2, 2, 2] and layout.patches.tolist() == [0, 2, 0, 1, 2, 3]
    assert [layout.entry(q) for q in range(7)] == [0, 2, 2, 6, 8, 8, 12]


# -- the memory estimate under bf16 autocast -----------------------------------------------------------------
def test_estimate_counts_the_float32_stream_under_autocast() -> None:
    """Under bf16 autocast of a float32 model the residual stream and the LayerNorm outputs stay float32 (read
    off the model, not assumed), and the estimate prices them at 4 bytes plus a bf16 copy of the norm output."""
    model, x = fg_model(), images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r0 = model.embed(x)
        block = model.blocks[0]
        assert r0.dtype == block(r0).dtype == block.norm1(r0).dtype == stream_dtype(model, torch.bfloat16)
        assert block.attn.qkv(block.norm1(r0)).dtype == torch.bfloat16
    assert stream_dtype(model, torch.bfloat16) == torch.float32
    t, d, heads = 65, 128, 4
    attn = heads * t * t * 2
    assert estimate_sequence_bytes(model, t, torch.bfloat16) == t * d * (2 * 4 + 11 * 2) + attn
    assert estimate_sequence_bytes(model, t, torch.float32) == t * d * 12 * 4 + heads * t * t * 4
    half = build_model(FG, kwargs={"depth": 1}).to(torch.bfloat16)  # held in bf16: a bf16 stream
    assert estimate_sequence_bytes(half, t, torch.bfloat16) == t * d * 12 * 2 + attn


# -- torch.compile -------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_compiled_apply() -> object:
    compiled_apply.cache_clear()
    yield
    compiled_apply.cache_clear()
    torch._dynamo.reset()


def test_compile_option_is_validated_and_configured(compose_cfg) -> None:
    from hydra.utils import instantiate

    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile"):
            CAAP(compile=bad)  # type: ignore[arg-type]
    assert instantiate(compose_cfg("method=caap").method).compile is False
    assert instantiate(compose_cfg("method=caap", "method.compile=true").method).compile is True


def test_compile_traces_the_blocks_on_chunks_of_one_shape(
    monkeypatch: pytest.MonkeyPatch, fresh_compiled_apply: object
) -> None:
    """compile=True runs the blocks through dynamo (here with its eager backend: inductor's C++ build takes
    minutes on a small CPU, see the slow test) on chunks of one width: 2 images x 64 patches in chunks of at
    most 50 are 3 chunks of 43 (the last padded), so the blocks compile two graphs (block, prefix-only last
    block), both at 43 sequences; the maps equal the eager engine's."""
    graphs: list[tuple[int, ...]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> object:
        graphs.append(tuple(t.shape[0] for t in example_inputs if isinstance(t, Tensor) and t.ndim == 3))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, **kw))
    model, x, target = fg_model(), images(), torch.tensor([1, 4])
    eager = CAAP(start=1, stop=4, chunk_size=50)(model, x, target)
    compiled = CAAP(start=1, stop=4, chunk_size=50, compile=True)
    torch.testing.assert_close(compiled(model, x, target), eager, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2 and {s for g in graphs for s in g} == {43}, graphs
    again = CAAP(start=1, stop=4, chunk_size=50)(model, images(seed=3), target)
    torch.testing.assert_close(compiled(model, images(seed=3), target), again, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2  # the second batch reuses both graphs


@pytest.mark.slow
def test_compile_with_inductor_equals_eager(fresh_compiled_apply: object) -> None:
    """The real `torch.compile` (inductor, C++ on the CPU) on a 2-block model: the maps equal the eager ones."""
    model, x, target = fg_model(depth=2), images(), torch.tensor([1, 4])
    eager = CAAP(start=0, stop=None, chunk_size=48)(model, x, target)
    compiled = CAAP(start=0, stop=None, chunk_size=48, compile=True)(model, x, target)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# -- GPU -----------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_chunk_loop_does_not_synchronise() -> None:
    """The chunk loop of `range_scores` under bf16 autocast with `set_sync_debug_mode('error')`: any
    host-device synchronisation raises. The values equal those of the same call outside the debug mode."""
    model = copy.deepcopy(fg_model()).cuda()
    x = images(4, device="cuda")
    start, stops = 1, [3, 5]
    targets = torch.tensor([[1, 2], [3, 3], [0, 5], [7, 7]], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        states, prefix, logits, layout = engine_inputs(model, x, start, max(stops), window=1)
        args = (model, states, prefix, targets, layout, start, stops, "hold", "delta", 37, logits)
        want = range_scores(*args)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = range_scores(*args)
            runs = list(patched_runs(model, states, prefix, layout, start, range(start, 5), (3,), 50))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(runs) == math.ceil(4 * 64 / 50)
    for e in stops:
        torch.testing.assert_close(got[e], want[e])


@pytest.mark.gpu
@cuda
def test_cuda_compile_equals_eager() -> None:
    compiled_apply.cache_clear()
    model = copy.deepcopy(fg_model()).cuda()
    x, target = images(device="cuda"), torch.tensor([1, 4], device="cuda")
    eager = CAAP(start=1, stop=None, chunk_size=50)(model, x, target)
    got = CAAP(start=1, stop=None, chunk_size=50, compile=True)(model, x, target)
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@cuda
def test_cuda_estimate_bounds_the_measured_chunk_memory() -> None:
    """Peak memory of the patched runs of one chunk in bf16 autocast stays within the estimate (ViT-S/16 at
    224 px: 197 tokens; the source states and neutral prefix are allocated before the measurement)."""
    torch.manual_seed(0)
    model = build_model("vit_small_patch16_224").cuda().eval()
    x = torch.rand(2, 3, 224, 224, device="cuda")
    chunk = 256
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        states, prefix, _, layout = engine_inputs(model, x, 4, 12)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        list(patched_runs(model, states, prefix, layout, 4, range(4, 12), (), chunk))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    estimate = chunk * estimate_sequence_bytes(model, 197, torch.bfloat16)
    assert peak <= estimate, (peak / 2**20, estimate / 2**20)


@pytest.mark.gpu
@cuda
def test_cuda_loader_pins_the_source_images() -> None:
    from caap.data import AttributionDataModule
    from caap.data.synthetic import SyntheticGrid

    datamodule = AttributionDataModule(SyntheticGrid(size=4, image_size=56), batch_size=2)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].is_pinned()
