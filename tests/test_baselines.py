"""The field's baselines: shapes, determinism, hook cleanup, a one-patch known answer, rollout vs a reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from caap.methods import (
    RISE,
    AttentionRollout,
    AttributionMethod,
    FeatureAblation,
    GaussianPrior,
    KernelShap,
    Lime,
    Occlusion,
    RawAttention,
    TokenSampling,
)
from caap.methods.lime import patch_kernel_similarity
from caap.methods.rise import RiseMasks
from caap.methods.surrogate import WeightedRidge
from caap.models.attention import attention_readout, capture_attention, readout_rows, set_fused_attn
from caap.models.build import build_model
from caap.models.vit import ViTClassifier

FG = "vit_fashiongrid_patch7_56"
VARIANTS = {"cls": None, "avg": dict(class_token=False, global_pool="avg"), "reg": dict(reg_tokens=4)}

# small settings: the tests check behaviour, not estimator quality
METHODS: dict[str, Callable[[], AttributionMethod]] = {
    "attention_rollout": lambda: AttentionRollout(),
    "attention_rollout_max_discard": lambda: AttentionRollout(head_fusion="max", discard_ratio=0.5),
    "raw_attention": lambda: RawAttention(block=-2, head_fusion="min"),
    "occlusion": lambda: Occlusion(perturbations_per_eval=64),
    "feature_ablation": lambda: FeatureAblation(perturbations_per_eval=64),
    "rise": lambda: RISE(num_masks=64, batch_size=128, seed=3),
    "rise_centered": lambda: RISE(num_masks=64, batch_size=128, seed=3, centered=True),
    "token_sampling": lambda: TokenSampling(num_samples=64, seed=3),
    "kernel_shap": lambda: KernelShap(n_samples=100, perturbations_per_eval=100, seed=3),
    "lime": lambda: Lime(n_samples=100, perturbations_per_eval=100, seed=3),
    "gaussian_prior": lambda: GaussianPrior(sigma=2.0),
}
MODEL_FREE = {"gaussian_prior"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(kwargs: dict | None = None, **extra) -> ViTClassifier:
    torch.manual_seed(1)
    return build_model(FG, multilabel=True, kwargs=kwargs, **extra)


@pytest.fixture(scope="module")
def models() -> dict[str, ViTClassifier]:
    return {name: _model(kw) for name, kw in VARIANTS.items()}


def _batch(n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 56, 56, generator=g), torch.tensor([1, 4, 7, 2][:n])


# -- shapes and determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_shapes_and_determinism(models: dict[str, ViTClassifier], variant: str, method: str) -> None:
    model = models[variant]
    images, target = _batch()
    a = METHODS[method]()(model, images, target)
    b = METHODS[method]()(model, images, target)
    assert a.shape == (2, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if method not in MODEL_FREE:
        assert a.std() > 0  # a real map, not a constant


@pytest.mark.parametrize(
    "method", ["attention_rollout", "occlusion", "rise", "token_sampling", "kernel_shap"]
)
def test_batched_equals_one_at_a_time(models: dict[str, ViTClassifier], method: str) -> None:
    """Maps do not depend on batching: masks / coalitions are shared by every image, seeded per call."""
    model = models["reg"]
    images, target = _batch(3)
    batched = METHODS[method]()(model, images, target)
    single = torch.cat([METHODS[method]()(model, images[i : i + 1], target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_rise_centered_is_the_offset_free_form(models: dict[str, ViTClassifier]) -> None:
    """centered = plain minus mean score x the mask coverage / (N p), with the same masks."""
    images, target = _batch()
    model = models["cls"]
    plain = RISE(num_masks=32, seed=1)(model, images, target)
    centered = RISE(num_masks=32, seed=1, centered=True)(model, images, target)
    masks = RiseMasks(32, 56, 56, 14, 0.5, 1).build(torch.arange(32), images.device)
    with torch.no_grad():
        x = (
            images[:, None] * masks[None, :, None] + (1 - masks[None, :, None]) * model.mean[:, None]
        ).flatten(0, 1)
        scores = model.probabilities(model(x))[torch.arange(64), target.repeat_interleave(32)].reshape(2, 32)
    cover = torch.nn.functional.avg_pool2d(masks.sum(0)[None, None], 7)[0, 0] / (32 * 0.5)
    torch.testing.assert_close(plain - centered, scores.mean(1)[:, None, None] * cover, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked_value", ["mean", "black"])
def test_rise_equals_the_official_formula(models: dict[str, ViTClassifier], masked_value: str) -> None:
    """Official RISE (eclique/RISE `explanations.py`, `RISE.forward`): `stack = masks * x` on the
    *normalised* tensor x, `sal = scores^T masks / N / p1`; so a masked pixel is the normalisation mean colour
    (0.2 here, not black). `masked_value=black` multiplies in pixel space instead."""
    model = models["cls"]
    assert float(model.mean.min()) > 0  # the two options differ on this model
    images, target = _batch()
    n = 16
    got = RISE(num_masks=n, seed=2, masked_value=masked_value)(model, images, target)
    masks = RiseMasks(n, 56, 56, 14, 0.5, 2).build(torch.arange(n), images.device)  # [N, H, W]
    want = []
    with torch.no_grad():
        for i in range(2):
            if masked_value == "mean":  # the official code: timm's own forward on masks * normalised image
                logits = model.model(masks[:, None] * model.normalize(images[i : i + 1]))
            else:
                logits = model(masks[:, None] * images[i : i + 1])
            scores = model.probabilities(logits)[:, target[i]]  # [N]
            sal = (scores @ masks.reshape(n, -1)).reshape(56, 56) / n / 0.5
            want.append(torch.nn.functional.avg_pool2d(sal[None, None], 7)[0, 0])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="masked_value"):
        RISE(masked_value="grey")


def test_lime_weights_are_original_limes_kernel(
    models: dict[str, ViTClassifier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The surrogate's sample weights are original LIME's (marcotcr/lime `lime_image`: cosine distance between
    the binary patch vector z and the all-on vector, kernel `sqrt(exp(-d^2 / 0.25^2))`), written out here for
    the 64 patches of the model: d = 1 - sqrt(|z| / 64), all-off d = 1."""
    seen: list[tuple[Tensor, Tensor]] = []
    fit = WeightedRidge.fit

    def recording_fit(self: WeightedRidge, train_data: Any, **kwargs: Any) -> Any:
        for batch in train_data:
            seen.append((batch[0].reshape(batch[0].shape[0], -1), batch[2].reshape(-1)))
        return fit(self, train_data, **kwargs)

    monkeypatch.setattr(WeightedRidge, "fit", recording_fit)
    images, target = _batch(1)
    Lime(n_samples=40, perturbations_per_eval=40, seed=1)(models["cls"], images, target)
    z = torch.cat([x for x, _ in seen]).double()
    w = torch.cat([w for _, w in seen]).double()
    assert z.shape == (40, 64) and set(z.unique().tolist()) <= {0.0, 1.0}
    d = 1 - (z.sum(1) / 64).sqrt()
    want = torch.sqrt(torch.exp(-(d**2) / 0.25**2))
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-7)
    assert float(w.min()) < 0.6  # a real weighting (pixel cosine with width 1 kept every weight above 0.6)
    sim = patch_kernel_similarity(0.25)
    assert float(sim(None, None, torch.zeros(1, 64))) == pytest.approx(math.exp(-8))  # all off: d = 1
    assert float(sim(None, None, torch.ones(1, 64))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distance"):
        Lime(distance="euclidean")


def test_distilled_deit_attention_reads_both_head_tokens() -> None:
    """DeiT distilled averages the heads of the CLS and distillation tokens (rows 0 and 1), so raw attention,
    rollout and GenAtt read the mean of those two rows (patch columns), not the CLS row alone."""
    torch.manual_seed(0)
    model = build_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5, kwargs={"depth": 2})
    assert model.num_prefix_tokens == 2 and readout_rows(model) == "cls+dist"
    matrix = torch.rand(2, 6, 6)
    torch.testing.assert_close(
        attention_readout(model, matrix), 0.5 * (matrix[:, 0, 2:] + matrix[:, 1, 2:]), rtol=0, atol=0
    )
    images, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    with torch.no_grad(), capture_attention(model) as attentions:
        model(images)
    last = attentions[-1].float().mean(1)  # [B, T, T], heads averaged
    got = RawAttention(block=-1)(model, images, target).reshape(2, -1)
    torch.testing.assert_close(got, 0.5 * (last[:, 0, 2:] + last[:, 1, 2:]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, last[:, 0, 2:])  # the CLS row alone is a different map


def test_occlusion_equals_feature_ablation(models: dict[str, ViTClassifier]) -> None:
    images, target = _batch()
    for score in ("prob", "logit"):
        occ = Occlusion(baseline=0.3, score=score)(models["cls"], images, target)
        fa = FeatureAblation(baseline=0.3, score=score)(models["cls"], images, target)
        torch.testing.assert_close(occ, fa, rtol=1e-5, atol=1e-6)


def test_occlusion_is_the_score_drop(models: dict[str, ViTClassifier]) -> None:
    model = models["avg"]
    images, target = _batch(1)
    maps = Occlusion(score="logit")(model, images, target)
    with torch.no_grad():
        full = model(images)[0, target[0]]
        occluded = images.clone()
        occluded[..., 7:14, 21:28] = 0.0  # patch (1, 3)
        drop = full - model(occluded)[0, target[0]]
    torch.testing.assert_close(maps[0, 1, 3], drop, rtol=1e-4, atol=1e-5)


# -- hook cleanup ----------------------------------------------------------------------------------------
def _hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


def _fused_flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize("method", sorted(set(METHODS) - MODEL_FREE))
def test_cleanup_when_the_method_raises(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    set_fused_attn(model, True)
    model.blocks[1].attn.fused_attn = False  # mixed flags: each must come back as it was
    before = _fused_flags(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom inside the forward")

    monkeypatch.setattr(model.blocks[0].mlp, "forward", boom)  # after block 0's attention
    images, target = _batch()
    with pytest.raises(RuntimeError, match="boom"):
        METHODS[method]()(model, images, target)
    assert _hooks_left(model) == []
    assert _fused_flags(model) == before


def test_capture_attention_restores_after_success() -> None:
    model = _model()
    before = _fused_flags(model)
    images, _ = _batch()
    with capture_attention(model) as attns:
        assert not any(_fused_flags(model))
        model(images)
    assert len(attns) == model.depth and attns[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 65))
    assert _hooks_left(model) == [] and _fused_flags(model) == before


# -- attention rollout against a plain reference --------------------------------------------------------
def _reference_attention(model: ViTClassifier, images: Tensor) -> list[Tensor]:
    """softmax(q k^T / sqrt(d)) of every block recomputed from the modules' weights, block by block."""
    out = []
    x = model.embed(images)
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        b, t, _ = h.shape
        qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        out.append(((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).double())
        x = block(x)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_matches_reference(models: dict[str, ViTClassifier], variant: str, head_fusion: str) -> None:
    model = models[variant]
    images, target = _batch()
    with torch.no_grad():
        attns = _reference_attention(model, images)
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion]
    t = attns[0].shape[-1]
    eye = torch.eye(t, dtype=torch.float64)
    joint = eye.expand(2, t, t)
    for a in attns:
        a = 0.5 * fuse(a) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        joint = a @ joint
    npre = model.num_prefix_tokens
    # avg pool: the mean over the pooled patch-token rows; otherwise the CLS row
    want = joint[:, npre:, npre:].mean(1) if variant == "avg" else joint[:, 0, npre:]
    got = AttentionRollout(head_fusion=head_fusion)(model, images, target)
    torch.testing.assert_close(got.double(), want.reshape(2, 8, 8), rtol=1e-4, atol=1e-6)
    raw = RawAttention(block=2, head_fusion=head_fusion)(model, images, target)
    fused = fuse(attns[2])
    raw_want = fused[:, npre:, npre:].mean(1) if variant == "avg" else fused[:, 0, npre:]
    torch.testing.assert_close(raw.double(), raw_want.reshape(2, 8, 8), rtol=1e-4, atol=1e-6)


# -- the known answer: a model whose logit depends on one patch only ------------------------------------
K = 37  # the one patch that matters: row 4, column 5
C = 2  # the explained class


def _one_patch_model() -> ViTClassifier:
    """One block, avg pool, no norms. logit_C = 4 * GELU(mean normalised pixel of patch K) - 2, exactly.

    Coordinate 0 of token i is the mean normalised pixel of patch i plus -60 for every patch but K, so the MLP's
    GELU of it (written to coordinate 1) is exactly 0 for every other patch. The head reads 256 x the mean of
    coordinate 1. The attention output is zeroed (it cannot carry anything), but every query attends to patch
    K (its key reads a position-embedding coordinate that only patch K has), so attention maps point at K too.
    """
    model = _model(dict(class_token=False, global_pool="avg", depth=1))
    m = model.model
    d = m.embed_dim
    block = m.blocks[0]
    block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    m.norm, m.fc_norm = nn.Identity(), nn.Identity()
    with torch.no_grad():
        conv = m.patch_embed.proj
        conv.weight[:3] = 0.0
        conv.bias[:3] = 0.0
        conv.weight[0] = 1.0 / conv.weight[0].numel()  # coordinate 0 = mean normalised pixel of the patch
        m.pos_embed[0, :, :3] = 0.0
        m.pos_embed[0, :, 0] = -60.0
        m.pos_embed[0, K, 0] = 0.0
        m.pos_embed[0, K, 2] = 100.0  # only patch K has coordinate 2
        attn = block.attn
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        for h in range(attn.num_heads):
            attn.qkv.bias[h * attn.head_dim] = 1.0  # q = e_0 for every token
            attn.qkv.weight[d + h * attn.head_dim, 2] = 1.0  # k_0 = coordinate 2
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
        mlp = block.mlp
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.zero_()
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
        mlp.fc1.weight[0, 0] = 1.0
        mlp.fc2.weight[1, 0] = 1.0
        m.head.weight.zero_()
        m.head.bias.zero_()
        m.head.weight[C, 1] = 4.0 * 64
        m.head.bias[C] = -2.0
    return model


KNOWN = {
    "attention_rollout": lambda: AttentionRollout(),
    "raw_attention": lambda: RawAttention(),
    "occlusion": lambda: Occlusion(),
    "feature_ablation": lambda: FeatureAblation(),
    "rise": lambda: RISE(num_masks=256, cell_size=1, batch_size=256),
    "rise_centered": lambda: RISE(num_masks=256, cell_size=1, batch_size=256, centered=True),
    "token_sampling": lambda: TokenSampling(num_samples=128),
    "kernel_shap": lambda: KernelShap(n_samples=100, perturbations_per_eval=100),
    "lime": lambda: Lime(n_samples=100, perturbations_per_eval=100),
}


def test_one_patch_model_is_what_it_claims() -> None:
    model = _one_patch_model()
    images, _ = _batch(1, seed=5)
    with torch.no_grad():
        logit = model(images)[0, C]
        x_k = ((images - 0.2) / 0.3)[0, :, 28:35, 35:42].mean()  # patch 37 = row 4, column 5
        torch.testing.assert_close(logit, 4 * torch.nn.functional.gelu(x_k) - 2, rtol=1e-5, atol=1e-5)
        other = images.clone()
        other[..., :28, :] = torch.rand(1, 3, 28, 56)  # every patch above row 4 changes
        assert float(model(other)[0, C]) == float(logit)


KNOWN_CASES = [(m, s) for m in KNOWN for s in ((None,) if "attention" in m else ("prob", "logit"))]


@pytest.mark.parametrize(("method", "score"), KNOWN_CASES)
def test_known_answer_one_patch(method: str, score: str | None) -> None:
    """Every method that can see the dependence ranks patch K first, strictly, for both images."""
    model = _one_patch_model()
    images, _ = _batch(2, seed=5)
    target = torch.tensor([C, C])
    explainer = KNOWN[method]()
    if score is not None:
        explainer.score = score
    maps = explainer(model, images, target).reshape(2, -1)
    assert (maps.argmax(1) == K).all(), maps
    assert (maps[:, K] > maps.topk(2, dim=1).values[:, 1] + 1e-6).all()  # strictly first


# -- the Gaussian prior's closed form ---------------------------------------------------------------------
def test_gaussian_prior_is_the_centred_gaussian_of_its_sigma() -> None:
    """Patch (i, j) of a gh x gw grid gets exp(-d^2 / (2 sigma^2)), d its distance in patches to the grid centre
    ((gh - 1) / 2, (gw - 1) / 2); on a 4 x 6 grid (28 x 42 px) the centre lies between four patches."""
    model = _model(dynamic_img_size=True)
    images = torch.rand(3, 3, 28, 42)
    sigma = 1.5
    maps = GaussianPrior(sigma=sigma)(model, images, torch.tensor([0, 1, 2]))
    expected = torch.tensor(
        [[math.exp(-((i - 1.5) ** 2 + (j - 2.5) ** 2) / (2 * sigma**2)) for j in range(6)] for i in range(4)]
    )
    assert maps.shape == (3, 4, 6)
    for m in maps:
        torch.testing.assert_close(m, expected, rtol=1e-6, atol=1e-7)
    assert math.isclose(float(maps[0, 1, 2]), math.exp(-1 / 9), rel_tol=1e-6)  # d^2 = 0.5: a central patch
    assert math.isclose(float(maps[0, 0, 0]), math.exp(-8.5 / 4.5), rel_tol=1e-6)  # a corner


# -- configuration errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: AttentionRollout(head_fusion="sum"), r"method.head_fusion='sum'.*allowed.*mean"),
        (lambda: AttentionRollout(discard_ratio=1.0), r"method.discard_ratio=1.0"),
        (lambda: RawAttention(head_fusion="median"), r"method.head_fusion='median'.*allowed"),
        (lambda: Occlusion(window=0), r"method.window=0"),
        (lambda: Occlusion(baseline=2.0), r"method.baseline=2.0"),
        (lambda: FeatureAblation(score="logprob"), r"method.score='logprob'.*allowed.*prob.*logit"),
        (lambda: RISE(p=1.5), r"method.p=1.5"),
        (lambda: RISE(num_masks=0), r"method.num_masks=0"),
        (lambda: TokenSampling(keep_prob=0.0), r"method.keep_prob=0.0"),
        (lambda: KernelShap(n_samples=-1), r"method.n_samples=-1"),
        (lambda: Lime(kernel_width=0.0), r"method.kernel_width=0.0"),
        (lambda: GaussianPrior(sigma=0), r"method.sigma=0"),
    ],
)
def test_bad_config_fails_clearly(build: Callable[[], AttributionMethod], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build()


def test_raw_attention_block_out_of_range(models: dict[str, ViTClassifier]) -> None:
    images, target = _batch()
    with pytest.raises(ValueError, match=r"method.block=6 is out of range.*allowed: -6..5"):
        RawAttention(block=6)(models["cls"], images, target)


def test_token_pool_without_prefix_fails_clearly() -> None:
    model = _model(dict(class_token=False, global_pool="avg"))
    model.model.global_pool = "token"  # an inconsistent head: nothing to read
    images, target = _batch()
    for method in (AttentionRollout(), TokenSampling(num_samples=4)):
        with pytest.raises(ValueError, match="no prefix token"):
            method(model, images, target)
