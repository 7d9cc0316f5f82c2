"""Real backbones at real size with random weights: every conf/model option builds, reproduces timm, runs the
CAAP engine on a few patches and a gradient method on one image; methods that cannot apply fail at setup."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from caap.methods import CAAP, AttentionRollout, FullGradPlus, GenAtt, RawAttention, TokenSampling
from caap.methods.gradient import Gradient
from caap.methods.libragrad import libragrad
from caap.methods.patching import neutral_prefix, patch_positions, patched_logits, source_states
from caap.models import ViTClassifier, build_model
from caap.token_removal import removal_logits
from test_caap import reference_maps

# (config, expected family, pooling, input side, crop_pct); the heavy ones are slow (ViT-B builds stay fast)
CONFIGS = [
    ("vit_small_augreg", "vit", "token", 224, 0.9),
    ("vit_base_augreg", "vit", "token", 224, 0.9),
    ("deit_small_distilled", "vit", "distilled", 224, 0.9),
    ("eva02_small", "eva", "avg", 336, 1.0),
    pytest.param("deit_base_distilled", "vit", "distilled", 224, 0.9, marks=pytest.mark.slow),
    pytest.param("deit3_base", "vit", "token", 224, 0.9, marks=pytest.mark.slow),
    pytest.param("dinov2_base_reg", "vit", "token+avg", 224, 0.875, marks=pytest.mark.slow),
    pytest.param("clip_base_ft", "vit", "token", 224, 0.9, marks=pytest.mark.slow),
    pytest.param("clip_base_zeroshot", "vit", "token", 224, 0.9, marks=pytest.mark.slow),
    pytest.param("mixer_base", "mixer", "avg", 224, 0.875, marks=pytest.mark.slow),
]


def _engine_check(model: ViTClassifier, images: torch.Tensor, expected: torch.Tensor) -> None:
    """CAAP over the full range on two patch sets: all patches reproduce the source logits `expected`; a few
    patches give finite logits."""
    n = model.grid_size(images)[0] * model.grid_size(images)[1]
    start, stop = 0, model.depth + 1
    states = source_states(model, images, patch_positions(start, stop, "hold"))
    prefix = neutral_prefix(model, torch.zeros_like(images), start)
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[0] = True
    masks[1, :3] = True  # a few patches
    with torch.no_grad():
        logits = patched_logits(model, states, prefix, masks, start, stop, chunk_size=8)
    torch.testing.assert_close(logits[:, 0], expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(logits[:, 1]).all()


@pytest.mark.parametrize(("config", "family", "pooling", "side", "crop_pct"), CONFIGS)
def test_model_config_builds_at_real_size_and_runs(
    compose_cfg, config, family, pooling, side, crop_pct
) -> None:
    torch.manual_seed(0)
    cfg = compose_cfg(f"model={config}", "model.pretrained=false")
    model: ViTClassifier = instantiate(cfg.model)
    assert (model.family, model.pooling, model.image_size) == (family, pooling, (side, side))
    assert model.data_config["crop_pct"] == crop_pct and model.data_config["input_size"] == (3, side, side)
    assert model.num_classes == 1000 and len(model.class_names) == 1000
    images = torch.rand(1, 3, side, side)
    classifier = model.model.get_classifier()
    if isinstance(classifier, torch.nn.Linear) and not classifier.weight.any():
        with torch.no_grad():  # timm zero-initialises some heads (MLP-Mixer): every logit would be 0
            classifier.weight.normal_(0.0, classifier.in_features**-0.5)
    with torch.no_grad():
        logits = model(images)
        if model.classifier is None:  # our residual-stream surface equals timm's own forward
            torch.testing.assert_close(logits, model.model(model.normalize(images)), rtol=0, atol=1e-5)
    _engine_check(model, images, logits)
    # LibraGrad's gradient at real size: the L2 norm over channels of d logit / d r_0 at each patch token,
    # differentiated by hand under the same rules
    maps = Gradient(libragrad="full", score="logit")(model, images, torch.tensor([3]))
    r0 = model.embed(images).detach().requires_grad_(True)
    with torch.enable_grad(), libragrad(model, "full"):
        (grad,) = torch.autograd.grad(model.head(model.forward_blocks(r0))[0, 3], r0)
    want = grad[0, model.num_prefix_tokens :].norm(dim=-1).reshape(model.grid_size(images))
    torch.testing.assert_close(maps[0], want, rtol=1e-4, atol=1e-8)
    assert want.std() > 0  # a head that reads the tokens


def test_dinov2_head_reads_cls_and_mean_patch_token(tmp_path) -> None:
    """The DINOv2 linear head is Linear([CLS, mean patch token]) with registers excluded, loaded from a file."""
    torch.manual_seed(0)
    head = torch.nn.Linear(2 * 384, 7)
    path = tmp_path / "dinov2_vits14_reg4_linear_head.pth"
    torch.save({"weight": head.weight.detach(), "bias": head.bias.detach()}, path)
    model = build_model(
        "vit_small_patch14_reg4_dinov2",
        img_size=56,
        head="dinov2_linear",
        head_weights=str(path),
        num_classes=7,
    )
    assert model.num_prefix_tokens == 5 and model.pooling == "token+avg"
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        x = model.model.forward_features(model.normalize(images))  # timm: final-normed tokens
        expected = head(torch.cat([x[:, 0], x[:, 5:].mean(1)], dim=-1))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    torch.save({"weight": torch.zeros(7, 5 * 384), "bias": torch.zeros(7)}, path)
    with pytest.raises(ValueError, match="linear4"):
        build_model(
            "vit_small_patch14_reg4_dinov2", img_size=56, head="dinov2_linear", head_weights=str(path)
        )


@pytest.mark.parametrize(
    "build",
    [
        {"name": "vit_small_patch14_reg4_dinov2", "img_size": 56, "head": "dinov2_linear", "num_classes": 5},
        {"name": "eva02_tiny_patch14_224", "img_size": 56, "num_classes": 5},
        {
            "name": "vit_tiny_patch16_224",
            "img_size": 64,
            "num_classes": 5,
            "kwargs": {"global_pool": "avgmax"},
        },
        {"name": "deit_tiny_distilled_patch16_224", "img_size": 64, "num_classes": 5},
    ],
    ids=["dinov2_cls_mean", "eva_avg", "vit_avgmax", "deit_distilled"],
)
def test_pooling_of_kept_tokens_equals_pooling_the_shortened_sequence(build) -> None:
    """`head(x, keep)` (token-removal metrics) = the head on the sequence with the dropped patch tokens removed."""
    torch.manual_seed(0)
    model = build_model(**build)
    p, n, d = model.num_prefix_tokens, 16, model.model.embed_dim
    x = torch.randn(3, p + n, d)
    keep = torch.rand(3, n) < 0.5
    keep[0] = False  # nothing kept: an all-zero pool (prefix pools ignore it)
    with torch.no_grad():
        got = model.head(x, keep)
        for b in range(1, 3):
            short = torch.cat([x[b, :p], x[b, p:][keep[b]]])[None]
            torch.testing.assert_close(got[b : b + 1], model.head(short), rtol=1e-5, atol=1e-5)


def _rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout `[B, T, T]` of per-block `[B, T, T]` matrices: prod of row-normalised (A + I) / 2."""
    t = attentions[0].shape[-1]
    eye = torch.eye(t, dtype=attentions[0].dtype)
    joint = eye.expand_as(attentions[0])
    for a in attentions:
        a = 0.5 * (a + eye)
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    return joint


def _eva_reference_attention(
    model: ViTClassifier, images: torch.Tensor, target: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, EVA's post-softmax attention `[B, heads, T, T]` recomputed from the attention module's input,
    weights and rotary embedding (timm's `apply_rot_embed_cat`), and the gradient of the target logit with
    respect to it: dS/dA = dS/dO v^T for the heads' output O = A v, read at the input of `attn.norm`."""
    from timm.layers import apply_rot_embed_cat

    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []

    def take_input(module, args, kwargs) -> None:
        inputs.append((args[0].detach(), kwargs["rope"]))

    def take_output(module, args) -> None:
        args[0].retain_grad()
        outputs.append(args[0])

    handles = []
    for block in model.blocks:
        handles.append(block.attn.register_forward_pre_hook(take_input, with_kwargs=True))
        handles.append(block.attn.norm.register_forward_pre_hook(take_output))
    try:
        with torch.enable_grad():
            logits = model(images)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    attentions, grads = [], []
    with torch.no_grad():
        for block, (x, rope), out in zip(model.blocks, inputs, outputs, strict=True):
            attn = block.attn
            b, t, _ = x.shape
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            n = attn.num_prefix_tokens
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope)], dim=2)
            attentions.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).double())
            grad_out = out.grad.reshape(b, t, attn.num_heads, -1).transpose(1, 2)
            grads.append((grad_out @ v.transpose(-2, -1)).double())
    return attentions, grads


def test_eva_attention_methods_match_a_reference() -> None:
    """EVA (rotary embeddings, avg pooling): raw attention, rollout and GenAtt equal references built on the
    attention recomputed from each block's weights and rope; LibraGrad detaches q and k (before rope)."""
    torch.manual_seed(0)
    model = build_model("eva02_tiny_patch14_224", img_size=56, num_classes=5)
    images, target = torch.rand(2, 3, 56, 56), torch.tensor([0, 4])
    attentions, grads = _eva_reference_attention(model, images, target)
    assert model.pooling == "avg" and not model.pool_include_prefix
    p = model.num_prefix_tokens

    def readout(matrix: torch.Tensor) -> torch.Tensor:  # avg pooling: the mean of the patch tokens' rows
        return matrix[:, p:, p:].mean(1).reshape(2, 4, 4)

    heads_mean = [a.mean(1) for a in attentions]
    genatt = [(a * g).clamp(min=0).mean(1) for a, g in zip(attentions, grads, strict=True)]
    eye = torch.eye(heads_mean[0].shape[-1], dtype=torch.float64)
    relevance = eye.expand_as(heads_mean[0])
    for a in genatt:
        relevance = (0.5 * (eye + a)) @ relevance
    expected = {
        RawAttention(): readout(heads_mean[-1]),
        AttentionRollout(): readout(_rollout(heads_mean)),
        GenAtt(): readout(relevance),
    }
    for method, want in expected.items():
        method.setup(model)
        torch.testing.assert_close(method(model, images, target).double(), want, rtol=1e-4, atol=1e-7)
    seen: list[bool] = []
    q_norm = model.model.blocks[0].attn.q_norm

    def record(module, args, out) -> None:
        seen.append(out.requires_grad)

    r0 = model.embed(images).detach().requires_grad_(True)
    with libragrad(model, "full"):
        handle = q_norm.register_forward_hook(record)  # after the rule's hook: sees the substituted output
        try:
            model.head(model.forward_blocks(r0)).sum().backward()
        finally:
            handle.remove()
    plain = model.embed(images).detach().requires_grad_(True)
    handle = q_norm.register_forward_hook(record)
    try:
        model.head(model.forward_blocks(plain)).sum().backward()
    finally:
        handle.remove()
    assert seen == [False, True]  # detached under LibraGrad, differentiable without
    assert not torch.allclose(r0.grad, plain.grad)


def _mixer() -> ViTClassifier:
    """timm's MLP-Mixer S/16 at 64 px (4 x 4 patches) with a random head: timm zero-initialises the head, which
    makes every logit 0 and every score-based check vacuous."""
    torch.manual_seed(0)
    model = build_model("mixer_s16_224", img_size=64, num_classes=5)
    head = model.model.head
    with torch.no_grad():
        head.weight.normal_(0.0, head.in_features**-0.5)
        head.bias.normal_(0.0, 0.1)
    return model


def test_methods_that_cannot_apply_fail_at_setup() -> None:
    mixer = _mixer()
    for method in (RawAttention(), AttentionRollout(), GenAtt(), TokenSampling()):
        with pytest.raises(ValueError, match="mixer"):
            method.setup(mixer)
    r0, keep = mixer.embed(torch.rand(1, 3, 64, 64)), torch.ones(1, 16, dtype=torch.bool)
    for removal in ("drop", "mask"):  # the engine refuses; replacement keeps the length and runs
        with pytest.raises(ValueError, match="fixed sequence length"):
            removal_logits(mixer, r0, keep, removal=removal)
    assert removal_logits(mixer, r0, keep, removal="replace", baseline=r0).shape == (1, 5)
    from caap.batch import AttributionBatch
    from caap.metrics import MIF, SRG

    with pytest.raises(ValueError, match="removal=replace"):  # LibraGrad's token dropping: refused at setup
        MIF().check_model(mixer)
    srg = SRG(removal="replace", baseline="black", ratios=[0.5])  # replacement works on the Mixer
    srg.check_model(mixer)
    g = torch.Generator().manual_seed(0)
    images, maps, classes = torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 4, 4, generator=g), [1, 3]
    batch = AttributionBatch(images=images, maps=maps, classes=torch.tensor(classes), index=torch.arange(2))
    srg.update(batch, mixer)
    # the Mixer's stem embeds each patch on its own (no position embedding): replacing 8 of the 16 tokens by
    # a black image's = blacking out those 8 patches of the image
    with torch.no_grad():
        want = []
        for i, c in enumerate(classes):
            ranking = maps[i].flatten().argsort(descending=True)
            probs = []
            for removed in (ranking[:8], ranking[8:]):  # MIF: most attributed first; LIF: least
                keep = torch.ones(16)
                keep[removed] = 0.0
                pixels = keep.view(1, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
                probs.append(mixer(images[i : i + 1] * pixels).softmax(-1)[0, c])
            lif_minus_mif = torch.stack([torch.zeros(()), probs[1] - probs[0]]).double()
            want.append(torch.trapezoid(lif_minus_mif, x=srg.axis()))
    torch.testing.assert_close(srg.compute(), torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    eva = build_model("eva02_tiny_patch14_224", img_size=56, num_classes=5)
    with pytest.raises(NotImplementedError, match="q_bias"):
        FullGradPlus().setup(eva)


def test_mixer_libragrad_fullgrad_plus_is_complete() -> None:
    """MLP-Mixer under LibraGrad (LayerNorm + GELU rules): FullGrad+ terms, token-mixing biases included, sum to
    the logit (FullGrad-completeness); CAAP equals the per-patch reference of tests/test_caap.py."""
    model = _mixer().double()
    images, target = torch.rand(2, 3, 64, 64, dtype=torch.float64), torch.tensor([1, 2])
    method = FullGradPlus(libragrad="full", score="logit")
    method.setup(model)
    total, score = method.completeness_terms(model, images, target)
    torch.testing.assert_close(total, score, rtol=1e-9, atol=1e-9)
    assert score.abs().min() > 1e-2  # a head that reads the tokens (timm's zero-initialised one gives 0 = 0)
    model, images = model.float(), images.float()
    caap = CAAP(start=0, stop=2, score="delta", window=2)
    caap.setup(model)
    reference = reference_maps(model, images, target, caap.neutral.images(images, model), 0, 2, "hold", 2)
    torch.testing.assert_close(caap(model, images, target), reference["delta"], rtol=1e-5, atol=1e-6)
    assert reference["delta"].std() > 1e-3  # not trivially constant


def test_offline_errors_say_how_to_provide_weights(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"not in the Hugging Face cache.*model\.weights="):
        build_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    # both checked before anything is built or loaded
    with pytest.raises(RuntimeError, match=r"model\.head_weights="):
        build_model("vit_small_patch14_reg4_dinov2", pretrained=True, head="dinov2_linear")
    with pytest.raises(RuntimeError, match=r"model\.clip_pretrained="):
        build_model("vit_base_patch16_clip_224.openai", pretrained=True, head="clip_zeroshot")
    with pytest.raises(ValueError, match="not a timm model name"):
        build_model("vit_small_patch16_224.no_such_tag")
    with pytest.raises(ValueError, match=r"model\.head="):
        build_model("vit_small_patch16_224", head="linear")


@pytest.mark.slow
def test_clip_zero_shot_equals_open_clip(tmp_path) -> None:
    """One open_clip checkpoint (random weights) for both towers: our zero-shot logits = open_clip's."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    names = ["cat", "dog", "tench"]
    model = build_model(
        "vit_base_patch16_clip_224.openai",
        pretrained=True,
        weights=str(path),
        head="clip_zeroshot",
        clip_pretrained=str(path),
        class_names=names,
        prompts="simple",
    )
    assert model.class_names == names and model.num_classes == 3
    images = torch.rand(2, 3, 224, 224)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        text = torch.stack(
            [
                torch.nn.functional.normalize(
                    torch.nn.functional.normalize(
                        clip.encode_text(tokenizer([t(c) for t in open_clip.SIMPLE_IMAGENET_TEMPLATES])),
                        dim=-1,
                    ).mean(0),
                    dim=-1,
                )
                for c in names
            ]
        )
        image = torch.nn.functional.normalize(clip.encode_image(model.normalize(images)), dim=-1)
        expected = clip.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-3)
