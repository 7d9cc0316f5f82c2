"""build_model and the ViT surface: wrapper equals timm, residual stream round-trips, clear errors, shipped weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torchmetrics.classification import MultilabelAveragePrecision

from caap.data import FashionGrid
from caap.models import FASHIONGRID_MODEL, ViTClassifier, build_model
from caap.models.embedded import FASHIONGRID

VARIANTS = {
    "cls": {},
    "avg_no_cls": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 4},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_residual_stream_reproduces_timm_forward(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(FASHIONGRID_MODEL, kwargs=VARIANTS[variant])
    images = torch.rand(3, 3, 56, 56)
    expected = model.model(model.normalize(images))
    r0 = model.embed(images)
    assert r0.shape == (3, model.num_prefix_tokens + 64, 128)
    split = model.forward_blocks(model.forward_blocks(r0, 0, 2), 2)
    torch.testing.assert_close(model.head(split), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    assert model.grid_size(images) == (8, 8)
    assert model.num_prefix_tokens == {"cls": 1, "avg_no_cls": 0, "registers": 5}[variant]


def test_fused_attention_switch_keeps_outputs() -> None:
    torch.manual_seed(0)
    fused = build_model(FASHIONGRID_MODEL, fused_attn=True)
    plain = build_model(FASHIONGRID_MODEL, fused_attn=False)
    plain.load_state_dict(fused.state_dict())
    assert all(not b.attn.fused_attn for b in plain.blocks) and all(b.attn.fused_attn for b in fused.blocks)
    images = torch.rand(2, 3, 56, 56)
    torch.testing.assert_close(plain(images), fused(images), rtol=1e-5, atol=1e-5)


def test_wrong_image_size_and_unsupported_models_fail_clearly() -> None:
    model = build_model(FASHIONGRID_MODEL)
    with pytest.raises(ValueError, match="expects 56x56"):
        model.grid_size(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="VisionTransformer-family"):
        ViTClassifier(torch.nn.Linear(2, 2), (0.5,), (0.5,), name="linear")
    with pytest.raises(ValueError, match="not a timm model name"):
        build_model("vit_no_such_model")
    with pytest.raises(FileNotFoundError, match=r"model.weights='/nonexistent.safetensors'"):
        build_model(FASHIONGRID_MODEL, weights="/nonexistent.safetensors")


def test_pretrained_without_local_weights_says_how_to_provide_them(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # read at import time, not from env
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hf-home")
    with pytest.raises(RuntimeError, match=r"model\.weights="):
        build_model("vit_tiny_patch16_224", pretrained=True)


def test_local_weights_file_loads(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_model(FASHIONGRID_MODEL)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = build_model(FASHIONGRID_MODEL, weights=str(path))
    images = torch.rand(2, 3, 56, 56)
    torch.testing.assert_close(loaded(images), source(images))


SHIPPED = {  # model, its benchmark data, the weights-size budget (MB), the test-mAP bar of the model card
    "fashiongrid": (FASHIONGRID, FashionGrid, 10, 0.90),
}


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_weights_and_model_card(shipped: str) -> None:
    """Each shipped model is safetensors (no pickle) within its size budget, its card records the recipe without
    machine paths, and the reloaded weights reach the card's bar (mAP) on 300 fresh test images (seed 123)."""
    spec, dataset, megabytes, bar = SHIPPED[shipped]
    assert spec.weights.stat().st_size <= megabytes * 2**20
    state = load_file(str(spec.weights))
    tokens = 1 + (spec.arch["img_size"] // spec.arch["patch_size"]) ** 2
    assert state["pos_embed"].shape == (1, tokens, spec.arch["embed_dim"])
    card = json.loads(spec.card.read_text())
    assert card["model"] == spec.name and card["test_mAP"] >= bar and len(card["test_AP_per_class"]) == 10
    assert {"config", "epochs", "seed"} <= card.keys()
    assert "output_dir" not in card["config"] and '"/' not in spec.card.read_text()  # no machine path

    model = build_model(spec.name, pretrained=True, multilabel=True)
    data = dataset(split="test", size=300, seed=123)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        probs = torch.cat([model.probabilities(model(x)) for x in batch["image"].split(100)])
    ap = MultilabelAveragePrecision(num_labels=10, average="macro")(probs, batch["target"].long())
    assert ap >= bar


def test_all_layer_ranges_are_every_valid_pair() -> None:
    from caap.models.layers import all_layer_ranges, resolve_layer_range

    ranges = all_layer_ranges(6)
    assert len(ranges) == 7 * 8 // 2 == len(set(ranges))
    assert ranges[0] == (0, 1) and ranges[-1] == (6, 7)
    for start, stop in ranges:  # each is accepted as-is by the resolver
        assert resolve_layer_range(start, stop, 6) == (start, stop)
    with pytest.raises(ValueError, match="depth=0"):
        all_layer_ranges(0)


def test_module_surfaces_name_what_hooks_and_reinitialisation_act_on() -> None:
    """ViTClassifier's module lists and LibraGrad's sites, per family, so that methods never reach model.model."""
    from torch import nn

    from caap.models.libragrad_sites import libragrad_sites

    vit = build_model(FASHIONGRID_MODEL)
    m = vit.model
    assert vit.modules_after_embedding() == [m.blocks, m.norm, m.fc_norm, m.head]
    assert vit.head_modules() == [m.norm, m.fc_norm, m.head] and vit.token_mixing_modules() == set()
    sites = libragrad_sites(vit)
    layer_norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(layer_norms) == 2 * vit.depth + 1  # norm1, norm2 per block, the final norm
    assert [mod for mod, centred in sites.norms if centred] == layer_norms
    assert sites.gated_activations == [b.mlp.act for b in m.blocks] and sites.gated_mlp_products == []
    assert [s.module for s in sites.attentions] == [b.attn for b in m.blocks]
    assert all(
        s.kind == "qkv" and s.qkv is s.module.qkv and s.out_norm is s.module.norm for s in sites.attentions
    )

    mixer = build_model("mixer_s16_224", img_size=64, num_classes=5)
    mixing = mixer.token_mixing_modules()
    assert mixing and all(
        b.mlp_tokens.fc1 in mixing and b.mlp_tokens.fc2 in mixing for b in mixer.model.blocks
    )
    assert not (mixing & set(mixer.model.blocks[0].mlp_channels.modules()))
    assert libragrad_sites(mixer).attentions == []

    eva = build_model("eva02_tiny_patch14_224", img_size=56, num_classes=5)
    eva_sites = libragrad_sites(eva)
    assert [s.kind for s in eva_sites.attentions] == ["rotary"] * eva.depth
    assert len(eva_sites.gated_mlp_products) == eva.depth  # SwiGLU: the gate product's rule site
