"""CAAP's estimators (`method.estimator`): where each must equal exact CAAP, the cases it must get right, costs.

Exact CAAP is tested against an independent per-patch reference in test_caap.py; here every estimator is held
to exact CAAP where it must agree with it (screened with fraction 1, adaptive with window 1 or refine 1, the
gradient estimate on models whose score is affine in the patched tokens), and to its own definition where it
does not (which patches are run exactly, how window effects are spread). Small random models on the CPU.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor, nn

from caap.methods.caap import CAAP
from caap.methods.caap_estimators import count_for_fraction
from caap.methods.patching import window_masks
from caap.models import build_model
from caap.models.layers import all_layer_ranges
from caap.models.vit import ViTClassifier

FG = "vit_fashiongrid_patch7_56"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def random_model(pool: str = "token") -> ViTClassifier:
    """The FashionGrid ViT on 28 px images (4 x 4 patches, 6 blocks), random weights with contrast."""
    torch.manual_seed(0)
    kwargs = {} if pool == "token" else {"class_token": False, "global_pool": "avg"}
    model = build_model(FG, img_size=28, kwargs=kwargs)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 1.5 / math.sqrt(mod.in_features))
    return model.eval()


def batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    """Three images, the first repeated with another class (two rows of one image, as under target=label)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 28, 28, generator=gen)
    return torch.cat([images, images[:1]]), torch.tensor([1, 4, 7, 2])


@functools.cache
def affine_timm_model() -> ViTClassifier:
    """Real timm blocks made affine: no norms, zero queries and keys (uniform attention: each token adds a
    linear map of the mean token), identity MLP activation, no final norm; CLS head. The target logit is then
    an affine function of every residual position, so a first-order estimate is exact."""
    model = random_model.__wrapped__()
    with torch.no_grad():
        for block in model.model.blocks:
            block.norm1, block.norm2, block.mlp.act = nn.Identity(), nn.Identity(), nn.Identity()
            d = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * d] = 0
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias[: 2 * d] = 0
        model.model.norm = nn.Identity()
    return model.eval()


class RelayBlock(nn.Module):
    """An affine block: the CLS token adds a linear map of the mean patch token, every patch token a linear
    map of the CLS token. A patch perturbed at position j reaches the other patches only at j + 2 (through CLS)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_cls, self.to_patches = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        update = torch.cat(
            [self.to_cls(patches.mean(1, keepdim=True)), self.to_patches(cls).expand_as(patches)], 1
        )
        return x + update


@functools.cache
def relay_model() -> ViTClassifier:
    """The FashionGrid ViT with `RelayBlock`s, no final norm, CLS head: affine, and the held token's own block
    updates do not respond to a single patch's perturbation for two positions (module docstring of RelayBlock),
    so the hold-mode increments estimate is exact for ranges of two positions."""
    model = random_model.__wrapped__()
    torch.manual_seed(3)
    d = model.model.embed_dim
    model.model.blocks = nn.Sequential(*[RelayBlock(d) for _ in model.model.blocks])
    model.model.norm = nn.Identity()
    return model.eval()


def close(a: Tensor, b: Tensor, tol: float = 1e-4) -> None:
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, scale))


# -- equal to exact where they must be --------------------------------------------------------------------
CASES = [
    dict(start=0, stop=2, mode="hold", score="delta", neutral="black"),
    dict(start=2, stop=5, mode="hold", score="logit", window=2, neutral={"kind": "blur", "sigma": 2.0}),
    dict(start=1, stop=None, mode="inject", score="prob", neutral={"kind": "noise", "num_samples": 2}),
]


@pytest.mark.parametrize("options", CASES)
def test_screened_with_fraction_one_equals_exact(options) -> None:
    model, (images, target) = random_model(), batch()
    exact = CAAP(**options)(model, images, target)
    screened = CAAP(estimator="screened", screen_fraction=1.0, **options)(model, images, target)
    close(screened, exact, 1e-6)


@pytest.mark.parametrize("options", CASES)
def test_screened_with_fraction_zero_is_the_gradient_estimate(options) -> None:
    model, (images, target) = random_model(), batch()
    gradient = CAAP(estimator="gradient", **options)(model, images, target)
    screened = CAAP(estimator="screened", screen_fraction=0.0, **options)(model, images, target)
    torch.testing.assert_close(screened, gradient, rtol=0, atol=0)
    assert not torch.allclose(gradient, CAAP(**options)(model, images, target), atol=1e-3)


@pytest.mark.parametrize("options", [CASES[0], {**CASES[1], "window": 1}, CASES[2]])
def test_adaptive_with_window_one_or_refine_one_equals_exact(options) -> None:
    model, (images, target) = random_model(), batch()
    exact = CAAP(**options)(model, images, target)
    for window, refine in ((1, 0.0), (3, 1.0)):  # 3 x 3 windows on 4 x 4 patches: smaller edge windows
        got = CAAP(estimator="adaptive", adaptive_window=window, adaptive_refine=refine, **options)(
            model, images, target
        )
        close(got, exact, 1e-6)


def test_gradient_inject_equals_exact_on_an_affine_model() -> None:
    """Real timm blocks made affine: the patched-run score is affine in the injected token at any start, so
    the first-order estimate is exact; sets of patches add up (window 2)."""
    model, (images, target) = affine_timm_model(), batch()
    depth = model.depth
    for start, window, score in (
        (0, 1, "logit"),
        (2, 1, "delta"),
        (depth - 1, 2, "logit"),
        (depth, 1, "logit"),
    ):
        options = dict(
            start=start, stop=None, mode="inject", score=score, window=window, neutral="mean_color"
        )
        exact = CAAP(**options)(model, images, target)
        assert exact.std() > 1e-3  # the patches matter: an all-constant map would pass trivially
        close(CAAP(estimator="gradient", **options)(model, images, target), exact)
        # hold over one position is inject
        one = {**options, "mode": "hold", "stop": start + 1}
        close(CAAP(estimator="gradient", **one)(model, images, target), exact)


def test_gradient_hold_increments_are_exact_where_the_held_token_is_not_fed_back() -> None:
    """Relay model, ranges of two positions from start >= 1: the source and neutral CLS differ, so the held
    token's difference grows inside the range (the increment term counts), while a single perturbed patch
    does not reach its own next update; the increments estimate is then exact, the injection term alone or a
    plain sum of gradient x difference over the range is not. Over three positions the dropped feedback
    (through CLS) makes the estimate approximate."""
    model, (images, target) = relay_model(), batch()
    for start in (1, 3):
        options = dict(start=start, stop=start + 2, mode="hold", score="logit", neutral="black")
        exact = CAAP(**options)(model, images, target)
        inject = CAAP(**{**options, "mode": "inject"})(model, images, target)
        assert (exact - inject).abs().max() > 1e-2  # holding differs from injecting here
        close(CAAP(estimator="gradient", **options)(model, images, target), exact)
    three = dict(start=1, stop=4, mode="hold", score="logit", neutral="black")
    approx = CAAP(estimator="gradient", **three)(model, images, target)
    assert (approx - CAAP(**three)(model, images, target)).abs().max() > 1e-3


def test_gradient_and_screened_range_maps_equal_attribute_range_by_range() -> None:
    model, (images, target) = random_model("avg"), batch()
    ranges = all_layer_ranges(model.depth)
    for estimator in ("gradient", "screened", "adaptive"):
        method = CAAP(estimator=estimator, score="delta", neutral={"kind": "blur", "sigma": 2.0})
        got = dict(method.range_maps(model, images, target, ranges))
        assert list(got) == ranges
        for start, stop in ranges[::4]:
            ref = CAAP(start=start, stop=stop, estimator=estimator, score="delta", neutral=method.neutral)
            close(got[(start, stop)], ref(model, images, target), 1e-5)
    # the cheap range estimate is the gradient estimator, whatever the configured one
    exact = CAAP(score="delta")
    estimated = dict(exact.estimated_range_maps(model, images, target, ranges))
    gradient = dict(CAAP(estimator="gradient", score="delta").range_maps(model, images, target, ranges))
    for r in ranges:
        torch.testing.assert_close(estimated[r], gradient[r], rtol=0, atol=0)


# -- their own definitions where they differ from exact --------------------------------------------------
def test_screened_runs_exactly_the_largest_estimated_effects() -> None:
    """Per map, the ceil(f n) patches of largest |gradient effect| carry the exact score, every other patch
    the gradient estimate (images with one class each, so no patch is run for another class)."""
    model, (images, target) = random_model(), batch()
    images, target = images[:3], target[:3]
    options = dict(start=1, stop=4, score="logit", neutral="black")
    exact = CAAP(**options)(model, images, target).flatten(1)
    gradient = CAAP(estimator="gradient", **options)(model, images, target).flatten(1)
    method = CAAP(estimator="screened", screen_fraction=0.3, **options)
    screened = method(model, images, target).flatten(1)
    with torch.no_grad():
        neutral_logit = model(torch.zeros(1, 3, 28, 28))[0, target][:, None]
    m = count_for_fraction(0.3, 16)
    assert m == 5 and method.cost.patched_runs == 3 * m
    chosen = torch.zeros_like(exact, dtype=torch.bool)
    chosen.scatter_(1, (gradient - neutral_logit).abs().topk(m, dim=1).indices, True)
    close(screened[chosen], exact[chosen])
    torch.testing.assert_close(screened[~chosen], gradient[~chosen], rtol=0, atol=0)


def test_adaptive_spreads_window_effects_and_refines_the_largest() -> None:
    """Unrefined windows: `neutral + (window score - neutral) / patches in window` on each patch (logit score,
    so a spread that forgets the neutral offset fails); refined windows: the exact per-patch scores."""
    model, (images, target) = random_model(), batch()
    images, target = images[:3], target[:3]
    options = dict(start=0, stop=2, score="logit", neutral="black")
    with torch.no_grad():
        neutral_logit = model(torch.zeros(1, 3, 28, 28))[0, target][:, None]
    exact = CAAP(**options)(model, images, target).flatten(1)
    windows = CAAP(window=3, **options)(model, images, target).flatten(1)  # window score on each patch
    _, index = window_masks(4, 4, 3)
    size = torch.bincount(index).float()[index]  # 9, 3, 3, 1 patches per window
    spread = neutral_logit + (windows - neutral_logit) / size
    spread = torch.where(size == 1, windows, spread)
    method = CAAP(estimator="adaptive", adaptive_window=3, adaptive_refine=0.0, **options)
    close(method(model, images, target).flatten(1), spread)
    assert method.cost.patched_runs == 3 * 4
    refine = CAAP(estimator="adaptive", adaptive_window=3, adaptive_refine=0.25, **options)
    got = refine(model, images, target).flatten(1)
    effect = (windows - neutral_logit).abs() * (size > 1)  # the one window of largest |effect| (of size > 1)
    top = effect.argmax(1)
    refined = index[None, :] == index[top][:, None]
    close(got[refined], exact[refined])
    close(got[~refined], spread[~refined])
    assert refine.cost.patched_runs == 3 * 4 + int(refined.sum())


# -- shapes, determinism, costs, hooks, validation -------------------------------------------------------
ESTIMATORS = ("exact", "gradient", "adaptive", "screened")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shapes_and_determinism(estimator: str) -> None:
    model, (images, target) = random_model("avg"), batch()
    method = CAAP(estimator=estimator, start=1, stop=3, score="delta")
    first = method(model, images, target)
    assert first.shape == (4, 4, 4) and torch.isfinite(first).all()
    torch.testing.assert_close(
        CAAP(estimator=estimator, start=1, stop=3, score="delta")(model, images, target),
        first,
        rtol=0,
        atol=0,
    )
    # a repeated image gives the map of asking for it alone, except where the runs chosen for its other class
    # made more patches exact (adaptive, screened)
    alone = method(model, images[3:], target[3:])
    exact = CAAP(start=1, stop=3, score="delta")(model, images[3:], target[3:])
    differs = (first[3:] - alone).abs() > 1e-5
    if estimator in ("exact", "gradient"):
        assert not differs.any()
    elif estimator == "screened":
        assert differs.any()  # the case is covered
    close(first[3:][differs], exact[differs], 1e-5)


def test_costs_in_forward_equivalents() -> None:
    """Exact: one run per patch from start (L - start blocks), a source pass to the last written position, one
    neutral pass. Gradient: one forward + backward (3 x) per class for an image-independent neutral."""
    model, (images, target) = random_model(), batch()
    depth, start, stop = model.depth, 2, 4
    exact = CAAP(start=start, stop=stop, score="delta")
    exact(model, images, target)
    unique = 3
    assert exact.cost.patched_runs == unique * 16
    expected = unique * 16 * (depth - start) / depth + unique * (stop - 1) / depth + 1.0
    assert exact.cost.forward_equivalents == pytest.approx(expected)
    exact(model, images, target)  # the neutral pass is cached now
    assert exact.cost.forward_equivalents == pytest.approx(2 * expected - 1.0)
    gradient = CAAP(estimator="gradient", start=start, stop=stop, score="delta")
    gradient(model, images, target)
    classes = 4
    assert gradient.cost.gradient_rows == classes and gradient.cost.patched_runs == 0
    assert gradient.cost.forward_equivalents == pytest.approx(
        3 * classes * (depth - start) / depth + unique * (stop - 1) / depth + 1.0
    )
    gradient.reset_cost()
    assert gradient.cost.forward_equivalents == 0.0


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_no_hooks_gradients_or_grad_mode_left_behind(estimator: str) -> None:
    model, (images, target) = random_model(), batch()
    before = _hooks(model)
    method = CAAP(estimator=estimator, start=1, stop=3)
    method(model, images, target)
    bad = target.clone()
    bad[-1] = model.num_classes  # out of range: fails inside the method
    with pytest.raises((IndexError, RuntimeError)):
        method(model, images, bad)
    assert _hooks(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"estimator": "fast"}, ["method.estimator='fast'", "exact", "gradient", "adaptive", "screened"]),
        ({"estimator": "screened", "screen_fraction": 1.5}, ["method.screen_fraction=1.5", "[0, 1]"]),
        ({"estimator": "adaptive", "adaptive_refine": -0.1}, ["method.adaptive_refine=-0.1", "[0, 1]"]),
        ({"estimator": "adaptive", "adaptive_window": 0}, ["method.adaptive_window=0", ">= 1"]),
        ({"estimator": "adaptive", "window": 2}, ["method.estimator=adaptive", "method.window=1"]),
    ],
)
def test_bad_estimator_options_fail_clearly(kwargs, needles) -> None:
    with pytest.raises(ValueError) as err:
        CAAP(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_estimator_options_compose_from_the_config(compose_cfg) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg("method.estimator=screened", "method.screen_fraction=0.25")
    method = instantiate(cfg.method)
    assert (method.estimator, method.screen_fraction, method.adaptive_window) == ("screened", 0.25, 2)
    with pytest.raises(Exception, match=r"method\.estimator='bogus'"):
        instantiate(compose_cfg("method.estimator=bogus").method)
