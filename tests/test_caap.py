"""CAAP (arXiv 2603.13652): the batched engine against an independent per-patch reference, and its invariants.

The reference patches one image and one patch set at a time with forward pre-hooks that overwrite tokens of
a full neutral forward; the engine batches (images x windows), reuses the neutral prefix and may shortcut the
last block. All models have random weights and are small (CPU, a few seconds in all).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor

from caap.methods.caap import CAAP
from caap.methods.patching import (
    neutral_prefix,
    patch_positions,
    patched_logits,
    patched_runs,
    patched_scores,
    resolve_chunk_size,
    source_states,
    unpatched_logits,
    window_masks,
)
from caap.models import build_model
from caap.models.layers import resolve_layer_range
from caap.models.memory import estimate_sequence_bytes
from caap.models.vit import ViTClassifier
from caap.references import IMAGE_KINDS, DatasetMeanImage, NoiseImages, build_reference

FG = "vit_fashiongrid_patch7_56"
# name -> (timm name, build kwargs, image size (h, w))
MODELS: dict[str, tuple[str, dict, dict, tuple[int, int]]] = {
    "fg_cls": (FG, {}, {}, (56, 56)),
    "fg_avg": (FG, {"img_size": 28}, {"class_token": False, "global_pool": "avg"}, (28, 28)),
    "fg_reg": (FG, {"img_size": 28}, {"reg_tokens": 4}, (28, 28)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 48}, {"depth": 4}, (48, 48)),
    "test_vit": ("test_vit", {"img_size": 64}, {}, (64, 64)),
    "fg_dynamic": (FG, {"dynamic_img_size": True}, {}, (28, 35)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def get_model(key: str, fused: bool = True) -> ViTClassifier:
    name, args, kwargs, _ = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, fused_attn=fused, kwargs=kwargs, **args)
    # Larger random weights than timm's init (std 0.02) so that patches matter and maps have contrast.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 1.5 / math.sqrt(mod.in_features))
    return model.eval()


def get_images(key: str, batch: int = 2, seed: int = 1) -> Tensor:
    h, w = MODELS[key][3]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=gen)


# -- the independent reference ---------------------------------------------------------------------------
def _site(model: ViTClassifier, j: int) -> torch.nn.Module:
    """Module whose input is r_j: block j, or the final norm for j = L."""
    return model.blocks[j] if j < model.depth else model.model.norm


def capture_residuals(model: ViTClassifier, image: Tensor) -> list[Tensor]:
    """r_0..r_L `[1, T, D]` of one image, read by pre-hooks on blocks and final norm."""
    store: dict[int, Tensor] = {}
    handles = []
    for j in range(model.depth + 1):

        def hook(mod, args, j=j):
            store[j] = args[0].detach().clone()

        handles.append(_site(model, j).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return [store[j] for j in range(model.depth + 1)]


def reference_logits(
    model: ViTClassifier,
    src: list[Tensor],
    neutral: Tensor,
    patches: list[int],
    start: int,
    stop: int,
    mode: str,
) -> Tensor:
    """Logits `[C]` of a full neutral forward with tokens `patches` overwritten by the source's (`src`, the
    residuals of `capture_residuals`) at the positions of the range."""
    positions = range(start, stop) if mode == "hold" else [start]
    tokens = torch.tensor(patches, dtype=torch.long) + model.num_prefix_tokens
    handles = []
    for j in positions:

        def hook(mod, args, j=j):
            x = args[0].clone()
            x[:, tokens] = src[j][:, tokens]
            return (x, *args[1:])

        handles.append(_site(model, j).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(neutral)[0]
    finally:
        for h in handles:
            h.remove()


def reference_maps(
    model: ViTClassifier,
    images: Tensor,
    target: Tensor,
    neutral_images: Tensor,
    start: int,
    stop: int,
    mode: str,
    window: int,
) -> dict[str, Tensor]:
    """Maps `[B, gh, gw]` for every score, one image, one window and one neutral sample at a time."""
    gh, gw = model.grid_size(images)
    out = {s: torch.zeros(images.shape[0], gh, gw) for s in ("logit", "prob", "logprob", "delta")}
    for b in range(images.shape[0]):
        t = int(target[b])
        src = capture_residuals(model, images[b : b + 1])
        for s in range(neutral_images.shape[0]):
            neutral = neutral_images[s, b if neutral_images.shape[1] > 1 else 0][None]
            with torch.no_grad():
                base = model(neutral)[0, t]
            for r0 in range(0, gh, window):
                for c0 in range(0, gw, window):
                    cells = [
                        (r, c)
                        for r in range(r0, min(gh, r0 + window))
                        for c in range(c0, min(gw, c0 + window))
                    ]
                    logits = reference_logits(
                        model, src, neutral, [r * gw + c for r, c in cells], start, stop, mode
                    )
                    if model.multilabel:
                        prob, logprob = logits[t].sigmoid(), torch.nn.functional.logsigmoid(logits[t])
                    else:
                        prob, logprob = logits.softmax(-1)[t], logits.log_softmax(-1)[t]
                    values = {"logit": logits[t], "prob": prob, "logprob": logprob, "delta": logits[t] - base}
                    for r, c in cells:
                        for key, v in values.items():
                            out[key][b, r, c] += float(v) / neutral_images.shape[0]
    return out


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- (1) engine == reference ------------------------------------------------------------------------------
CASES = [
    # model, start, stop, mode, window, neutral
    ("fg_cls", 2, 4, "hold", 1, "black"),
    ("fg_cls", 2, 4, "inject", 1, {"kind": "mean_color"}),
    ("fg_cls", 1, None, "hold", 2, {"kind": "blur", "sigma": 3.0}),
    ("fg_avg", 1, None, "hold", 1, {"kind": "noise", "seed": 3, "num_samples": 2}),
    ("fg_avg", -3, -1, "inject", 3, {"kind": "blur", "sigma": 2.0}),
    ("fg_reg", 0, 3, "hold", 1, {"kind": "mean_color", "rgb": [0.1, 0.5, 0.9]}),
    ("fg_reg", 3, None, "hold", 2, "black"),
    ("deit_distilled", 1, 3, "hold", 2, "black"),
    ("deit_distilled", 2, None, "inject", 1, {"kind": "noise", "distribution": "uniform"}),
    ("test_vit", 2, 5, "hold", 1, {"kind": "blur", "sigma": 4.0}),
    ("fg_dynamic", 2, 5, "hold", 1, "black"),
]


@pytest.mark.parametrize(("key", "start", "stop", "mode", "window", "neutral"), CASES)
def test_engine_matches_reference(key, start, stop, mode, window, neutral) -> None:
    model = get_model(key)
    images = get_images(key)
    target = torch.tensor([1, 3])
    s, e = resolve_layer_range(start, stop, model.depth, model.name)
    method = CAAP(start=start, stop=stop, mode=mode, window=window, neutral=neutral, chunk_size=37)
    ref = reference_maps(model, images, target, method.neutral.images(images, model), s, e, mode, window)
    for score in ("logit", "prob", "logprob", "delta"):
        method.score = score
        maps = method(model, images, target)
        assert maps.shape == (2, *model.grid_size(images))
        close(maps, ref[score])
    assert ref["logit"].std() > 1e-3  # the maps are not trivially constant


@pytest.mark.parametrize("neutral", ["black", {"kind": "blur", "sigma": 2.0}])
def test_rows_sharing_an_image_share_its_runs_and_match_separate_calls(neutral) -> None:
    """target=label repeats an image once per present class; the engine groups the rows (one set of patched
    runs per distinct image) and must give each row exactly the map a call for that row alone gives."""
    model = get_model("fg_cls")
    images = get_images("fg_cls", batch=3)
    rows = torch.tensor([0, 2, 0, 1, 0, 2])
    target = torch.tensor([1, 3, 5, 7, 9, 0])
    method = CAAP(start=2, stop=None, neutral=neutral, score="delta", chunk_size=50)
    grouped = method(model, images[rows], target)
    for r in range(len(rows)):
        close(grouped[r : r + 1], method(model, images[rows[r : r + 1]], target[r : r + 1]))


def test_head_tokens_only_is_exact_and_optional() -> None:
    model = get_model("fg_cls")
    images, target = get_images("fg_cls"), torch.tensor([0, 5])
    fast = CAAP(start=2, stop=5, chunk_size=50)
    slow = CAAP(start=2, stop=5, chunk_size=50, head_tokens_only=False)
    close(fast(model, images, target), slow(model, images, target))
    unfused = get_model("fg_cls", fused=False)
    close(fast(unfused, images, target), slow(model, images, target))


@pytest.mark.parametrize("key", ["fg_cls", "fg_avg"])  # with and without the prefix-only last block
def test_branch_points_equal_the_runs_they_stand_for(key: str) -> None:
    """A branch at e leaves the trunk before its write at e: at `start` it is the unpatched neutral run, at e
    the hold run of (start, e), after the last write the trunk itself; the trunk is unchanged by branching."""
    model, images = get_model(key), get_images(key)
    depth, (gh, gw) = model.depth, model.grid_size(images)
    start, mid, stop = 1, 3, depth + 1  # writes at 1..L (position L too: the branch at L skips it)
    states = source_states(model, images, range(start, stop))
    prefix = neutral_prefix(model, torch.full((1, 3, *images.shape[-2:]), 0.3), start)
    masks, _ = window_masks(gh, gw, 2)
    branches = (start, mid, depth, stop)
    with torch.no_grad():
        runs = list(patched_runs(model, states, prefix, masks, start, range(start, stop), branches, 5))
        trunk = torch.cat([logits for _, _, logits, _ in runs])
        got = {e: torch.cat([split[e] for *_, split in runs]) for e in branches}
        close(got[start], unpatched_logits(model, prefix, start).expand(len(trunk), -1))
        for e in (mid, depth, stop):
            close(got[e], patched_logits(model, states, prefix, masks, start, e, chunk_size=7).flatten(0, 1))
        close(trunk, got[stop])
    assert not torch.equal(got[mid], got[stop])


# -- (2) no patch / (3) all patches ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["fg_cls", "fg_avg", "fg_reg", "deit_distilled", "test_vit"])
def test_no_patch_gives_neutral_and_all_patches_give_source(key: str) -> None:
    model = get_model(key)
    images = get_images(key)
    num_patches = math.prod(model.grid_size(images))
    depth = model.depth
    masks = torch.stack(
        [torch.zeros(num_patches, dtype=torch.bool), torch.ones(num_patches, dtype=torch.bool)]
    )
    neutral = torch.full((1, 3, *images.shape[-2:]), 0.3)
    with torch.no_grad():
        source_logits, neutral_logits = model(images), model(neutral)
        # hold over every position 0..L-1 (and 0..L), and inject at 0
        for start, stop, mode in [(0, depth, "hold"), (0, depth + 1, "hold"), (0, 1, "inject")]:
            states = source_states(model, images, patch_positions(start, stop, mode))
            prefix = neutral_prefix(model, neutral, start)
            logits = patched_logits(model, states, prefix, masks, start, stop, mode, chunk_size=3)
            close(logits[:, 0], neutral_logits.expand(2, -1))
            close(logits[:, 1], source_logits)
        # a later start: no patch is still the neutral run, scored against itself
        start, stop = 2, depth
        states = source_states(model, images, patch_positions(start, stop, "hold"))
        prefix = neutral_prefix(model, neutral, start)
        target = torch.tensor([2, 7])
        delta = patched_scores(model, states, prefix, target, masks[:1], start, stop, "hold", "delta")
        close(delta, torch.zeros(2, 1))
        logit = patched_scores(model, states, prefix, target, masks[:1], start, stop, "hold", "logit")
        close(logit[:, 0], neutral_logits[0, target])
        close(unpatched_logits(model, prefix, start), neutral_logits)


# -- (4) clear errors -----------------------------------------------------------------------------------------
def test_layer_range_semantics() -> None:
    assert resolve_layer_range(2, 4, 6, "m") == (2, 4)
    assert resolve_layer_range(2, None, 6, "m") == (2, 7)
    assert resolve_layer_range(-1, None, 6, "m") == (6, 7)
    assert resolve_layer_range(-5, -2, 6, "m") == (2, 5)
    assert resolve_layer_range(0, 7, 6, "m") == (0, 7)


@pytest.mark.parametrize(
    ("start", "stop", "needles"),
    [
        (7, None, ["layers.start=7", "vit_fashiongrid_patch7_56", "L=6", "-7..6"]),
        (-8, None, ["layers.start=-8", "L=6"]),
        (2, 9, ["layers.stop=9", "L=6", "-7..7"]),
        (4, 2, ["empty layer range", "layers.start=4", "layers.stop=2", "L=6"]),
        (3, -4, ["empty layer range", "layers.stop=-4"]),
        (1.5, None, ["layers.start=1.5", "integer"]),
    ],
)
def test_bad_layer_range_fails_clearly(start, stop, needles) -> None:
    model = get_model("fg_cls")
    method = CAAP(start=start, stop=stop)
    with pytest.raises(ValueError) as err:
        method.setup(model)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"mode": "keep"}, ["mode='keep'", "hold", "inject"]),
        ({"score": "margin"}, ["score='margin'", "logit", "prob", "logprob", "delta"]),
        ({"window": 0}, ["window=0"]),
        ({"chunk_size": 4, "memory_budget_mb": 10}, ["chunk_size", "memory_budget_mb"]),
        ({"neutral": "grey"}, ["neutral.kind='grey'", *IMAGE_KINDS]),
        (
            {"neutral": {"kind": "noise", "distribution": "poisson"}},
            ["neutral.distribution='poisson'", "uniform"],
        ),
        ({"neutral": {"kind": "blur", "radius": 2}}, ["neutral.kind='blur'", "radius"]),
    ],
)
def test_bad_config_fails_clearly(kwargs, needles) -> None:
    with pytest.raises(ValueError) as err:
        CAAP(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_missing_files_and_unprepared_dataset_mean(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neutral\.path='.*nope\.png'"):
        build_reference({"kind": "image", "path": str(tmp_path / "nope.png")})
    with pytest.raises(FileNotFoundError, match="dataset_mean"):
        build_reference({"kind": "dataset_mean", "path": str(tmp_path / "mean.pt")})
    model, images = get_model("fg_cls"), get_images("fg_cls")
    method = CAAP(neutral="dataset_mean")
    with pytest.raises(RuntimeError, match="prepare"):
        method(model, images, torch.tensor([0, 1]))


# -- (5) determinism / (6) chunking / (7) bf16 --------------------------------------------------------------
def test_deterministic_and_seeded_noise() -> None:
    model, images, target = get_model("fg_reg"), get_images("fg_reg"), torch.tensor([4, 2])
    a = CAAP(start=1, stop=4, neutral={"kind": "noise", "seed": 7, "num_samples": 2})(model, images, target)
    b = CAAP(start=1, stop=4, neutral={"kind": "noise", "seed": 7, "num_samples": 2})(model, images, target)
    c = CAAP(start=1, stop=4, neutral={"kind": "noise", "seed": 8, "num_samples": 2})(model, images, target)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    noise = NoiseImages(seed=7, num_samples=3)
    assert torch.equal(noise.images(images, model), noise.images(images, model))
    assert noise.images(images, model).shape == (3, 1, 3, 28, 28)


def test_chunk_size_and_budget_do_not_change_results() -> None:
    model, images, target = get_model("fg_cls"), get_images("fg_cls"), torch.tensor([1, 2])
    ref = CAAP(start=2, stop=4, chunk_size=128)(model, images, target)
    for kwargs in (
        {"chunk_size": 1},
        {"chunk_size": 7},
        {"chunk_size": 10_000},
        {"memory_budget_mb": 2.0},
        {},
    ):
        close(CAAP(start=2, stop=4, **kwargs)(model, images, target), ref)
    per_seq = estimate_sequence_bytes(model, 65, torch.float32)
    assert per_seq == 65 * 128 * 4 * 12 + 4 * 65 * 65 * 4  # fused attention, mlp_ratio 4
    assert resolve_chunk_size(model, 65, memory_budget_mb=per_seq * 10 / 2**20) == 10
    assert resolve_chunk_size(model, 65, chunk_size=5) == 5
    assert resolve_chunk_size(model, 65, memory_budget_mb=1e-9) == 1


def test_bf16_autocast_cpu_agrees_loosely() -> None:
    model, images, target = get_model("fg_cls"), get_images("fg_cls"), torch.tensor([1, 2])
    method = CAAP(start=2, stop=4, neutral="mean_color")
    ref = method(model, images, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method(model, images, target)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    corr = torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1]
    assert corr > 0.95, corr
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


# -- (8) dynamic image size / caching / windows / neutrals -----------------------------------------------------
def test_dynamic_image_sizes() -> None:
    model = get_model("fg_dynamic")
    method = CAAP(start=2, stop=5)
    for h, w in [(42, 63), (56, 56), (28, 35)]:
        images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        maps = method(model, images, torch.tensor([0, 9]))
        assert maps.shape == (2, h // 7, w // 7)
    # the cached neutral prefix is keyed by image size: repeat the first size and compare with a fresh method
    images = torch.rand(2, 3, 42, 63, generator=torch.Generator().manual_seed(0))
    close(
        method(model, images, torch.tensor([0, 9])),
        CAAP(start=2, stop=5)(model, images, torch.tensor([0, 9])),
    )


def test_neutral_prefix_is_cached_and_invalidated(monkeypatch) -> None:
    import caap.methods.caap as caap_module

    model = build_model(FG, kwargs={"depth": 3}, img_size=28)
    images, target = torch.rand(2, 3, 28, 28), torch.tensor([0, 1])
    calls = []
    real = caap_module.neutral_states
    monkeypatch.setattr(caap_module, "neutral_states", lambda *a: calls.append(1) or real(*a))
    method = CAAP(start=1, stop=3, neutral="black")
    first = method(model, images, target)
    method(model, torch.rand(3, 3, 28, 28), torch.tensor([0, 1, 2]))
    assert len(calls) == 1  # image-independent: once per run
    with torch.no_grad():
        model.model.blocks[0].mlp.fc1.weight.mul_(2.0)
    second = method(model, images, target)
    assert len(calls) == 2 and not torch.equal(first, second)
    blur = CAAP(start=1, stop=3, neutral={"kind": "blur", "sigma": 1.0})
    blur(model, images, target)
    blur(model, images, target)
    assert len(calls) == 4  # image-dependent: once per batch


def test_hydra_style_config_and_pickling() -> None:
    import pickle

    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"start": 1, "stop": -2, "mode": "hold", "neutral": {"kind": "mean_color", "rgb": [0.2, 0.2, 0.2]}}
    )
    method = CAAP(**cfg)
    model, images, target = get_model("fg_reg"), get_images("fg_reg"), torch.tensor([0, 1])
    maps = method(model, images, target)
    clone = pickle.loads(pickle.dumps(method))  # the prefix cache is dropped
    assert clone._cache is None and method._cache is not None
    assert torch.equal(clone(model, images, target), maps)


def test_window_masks_cover_grid_with_smaller_edge_windows() -> None:
    masks, index = window_masks(5, 7, 2)
    assert masks.shape == (3 * 4, 35)
    assert torch.equal(masks.sum(0), torch.ones(35, dtype=torch.long))  # each patch in exactly one window
    assert masks.sum(1).tolist() == [4, 4, 4, 2, 4, 4, 4, 2, 2, 2, 2, 1]
    assert torch.equal(masks.float().argmax(0), index)
    masks1, index1 = window_masks(3, 3, 1)
    assert torch.equal(masks1, torch.eye(9, dtype=torch.bool)) and torch.equal(index1, torch.arange(9))


def test_neutral_kinds(tmp_path) -> None:
    from PIL import Image

    model, images = get_model("fg_cls"), get_images("fg_cls")
    path = tmp_path / "neutral.png"
    Image.new("RGB", (10, 20), (255, 0, 0)).save(path)
    expected = {
        "black": ((1, 1, 3, 56, 56), False),
        "mean_color": ((1, 1, 3, 56, 56), False),
        "blur": ((1, 2, 3, 56, 56), True),
        "noise": ((1, 1, 3, 56, 56), False),
        "image": ((1, 1, 3, 56, 56), False),
    }
    for kind, (shape, depends) in expected.items():
        neutral = build_reference({"kind": kind, "path": str(path)} if kind == "image" else kind)
        out = neutral.images(images, model)
        assert out.shape == shape and neutral.depends_on_image == depends, kind
        assert out.min() >= 0 and out.max() <= 1
    red = build_reference({"kind": "image", "path": str(path)}).images(images, model)
    close(red[0, 0, :, 10, 10], torch.tensor([1.0, 0.0, 0.0]))
    close(build_reference("mean_color").images(images, model)[0, 0, :, 0, 0], model.mean.flatten())

    dataset = [{"image": torch.full((3, 28, 28), float(i))} for i in range(4)]
    mean = DatasetMeanImage()
    assert mean.needs_data
    mean.prepare(dataset, max_images=3)
    close(mean.mean_image, torch.full((3, 28, 28), 1.0))
    loader = [{"image": torch.stack([d["image"] for d in dataset[:2]])}, {"image": dataset[3]["image"][None]}]
    mean.prepare(loader)
    close(mean.mean_image, torch.full((3, 28, 28), 4.0 / 3))
    for name in ("mean.pt", "mean.safetensors"):
        mean.save(str(tmp_path / name))
        loaded = build_reference({"kind": "dataset_mean", "path": str(tmp_path / name)})
        out = loaded.images(images, model)  # resized 28 -> 56
        assert out.shape == (1, 1, 3, 56, 56)
        close(out, torch.full_like(out, 4.0 / 3))


@pytest.mark.parametrize(("sigma", "kernel_size"), [(1.5, None), (2.0, 7)])
def test_blur_neutral_is_the_gaussian_of_its_sigma(sigma: float, kernel_size: int | None) -> None:
    """The blur neutral against closed forms: a delta image blurs to the normalised Gaussian kernel
    `exp(-x^2 / (2 sigma^2))` of the configured sigma (radius ceil(3 sigma) by default, else kernel_size // 2),
    and any image to scipy's `gaussian_filter` with replicated borders (scipy's `nearest` mode)."""
    from scipy.ndimage import gaussian_filter

    model = get_model("fg_cls")
    options = {"kind": "blur", "sigma": sigma} | ({} if kernel_size is None else {"kernel_size": kernel_size})
    neutral = CAAP(neutral=options).neutral
    half = math.ceil(3 * sigma) if kernel_size is None else kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / g.sum() ** 2
    delta = torch.zeros(1, 3, 56, 56)
    delta[0, :, 20, 30] = 1.0
    blurred = neutral.images(delta, model)
    assert blurred.shape == (1, 1, 3, 56, 56)
    expected = torch.zeros(56, 56, dtype=torch.float64)
    expected[20 - half : 21 + half, 30 - half : 31 + half] = kernel
    for c in range(3):
        close(blurred[0, 0, c].double(), expected, tol=1e-7)
    images = get_images("fg_cls")
    reference = gaussian_filter(images.double().numpy(), sigma, mode="nearest", radius=half, axes=(2, 3))
    close(neutral.images(images, model)[0].double(), torch.from_numpy(reference), tol=1e-6)


# -- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [FG, "vit_small_patch16_224"])
def test_cuda_bf16_fused_agrees_with_fp32(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # true fp32 on the GPU (cuDNN runs the patch-embedding conv in TF32 by default), so the engine and the
    # reference loop, whose batch shapes pick different kernels, agree to fp32 precision
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(name, fused_attn=True).cuda().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 1.5 / math.sqrt(mod.in_features))
    size = model.model.patch_embed.img_size
    images = torch.rand(4, 3, *size, device="cuda")
    target = torch.tensor([0, 1, 2, 3], device="cuda")
    start = model.depth // 3
    method = CAAP(start=start, stop=None, neutral="mean_color")
    ref = method(model, images, target)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = method(model, images, target)
    corr = torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1]
    assert corr > 0.95, corr
    if name == FG:  # and fp32 on the GPU equals the reference loop
        ref_maps = reference_maps(
            model,
            images[:1],
            target[:1],
            method.neutral.images(images, model),
            start,
            model.depth + 1,
            "hold",
            1,
        )
        close(ref[:1], ref_maps["logit"].cuda(), tol=1e-4)
