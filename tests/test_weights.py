"""Weights given to build_model: heads of another size, AugReg .npz files, hub downloads, checkpoints of another
architecture and files that are no checkpoint at all. Every case is a real file written here, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from caap.models import FASHIONGRID_MODEL, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(img_size=56, patch_size=7, depth=2)  # a ViT-Tiny-wide model at 56 px: fast, real layout


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    return set(keys) == {k for k in sb if not k.startswith(skip)} and all(
        torch.equal(sa[k], sb[k]) for k in keys
    )


def write_augreg_npz(model: torch.nn.Module, path: Path) -> Path:
    """A timm ViT's weights in the AugReg (vit_jax) `.npz` layout, as `ViT-S_16.npz` holds them: flax kernels
    `[in, out]`, attention kernels split per head `[D, H, D/H]`, the patch kernel `[kh, kw, 3, D]`."""
    d, h = model.embed_dim, model.blocks[0].attn.num_heads

    def n(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().copy()

    w = {
        "embedding/kernel": n(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": n(model.patch_embed.proj.bias),
        "cls": n(model.cls_token),
        "Transformer/posembed_input/pos_embedding": n(model.pos_embed),
        "Transformer/encoder_norm/scale": n(model.norm.weight),
        "Transformer/encoder_norm/bias": n(model.norm.bias),
        "head/kernel": n(model.head.weight.T),
        "head/bias": n(model.head.bias),
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = f"{p}MultiHeadDotProductAttention_1/"
        w[f"{p}LayerNorm_0/scale"], w[f"{p}LayerNorm_0/bias"] = n(block.norm1.weight), n(block.norm1.bias)
        w[f"{p}LayerNorm_2/scale"], w[f"{p}LayerNorm_2/bias"] = n(block.norm2.weight), n(block.norm2.bias)
        for j, part in enumerate(("query", "key", "value")):
            rows = slice(j * d, (j + 1) * d)
            w[f"{mha}{part}/kernel"] = n(block.attn.qkv.weight[rows].T.reshape(d, h, d // h))
            w[f"{mha}{part}/bias"] = n(block.attn.qkv.bias[rows].reshape(h, d // h))
        w[f"{mha}out/kernel"] = n(block.attn.proj.weight.reshape(d, h, d // h).permute(1, 2, 0))
        w[f"{mha}out/bias"] = n(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = n(fc.weight.T)
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = n(fc.bias)
    np.savez(path, **w)
    return path


def test_head_of_another_size_is_refused_unless_reset_head(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **SMALL)
    path = save_weights(source, tmp_path / "in1k.safetensors")
    with pytest.raises(
        ValueError, match=r"model\.num_classes=5 but the head .* has 1000 classes.*reset_head=true"
    ):
        build_model("vit_tiny_patch16_224", weights=str(path), num_classes=5, img_size=56, kwargs=SMALL)
    reset = build_model(
        "vit_tiny_patch16_224", weights=str(path), num_classes=5, reset_head=True, img_size=56, kwargs=SMALL
    )
    assert reset.num_classes == 5 and reset.model.head.weight.shape == (5, 192)
    assert same_weights(reset.model, source, skip=("head.",))  # everything but the head is the checkpoint's
    kept = build_model("vit_tiny_patch16_224", weights=str(path), img_size=56, kwargs=SMALL)
    assert kept.num_classes == 1000 and same_weights(kept.model, source)

    # a fine-tuned checkpoint keeps its own head when num_classes is left out (timm would build 1000)
    tuned = timm.create_model("vit_tiny_patch16_224", num_classes=7, **SMALL)
    loaded = build_model(
        "vit_tiny_patch16_224", weights=str(save_weights(tuned, tmp_path / "t.safetensors")), kwargs=SMALL
    )
    assert loaded.num_classes == 7 and same_weights(loaded.model, tuned)

    # the model's own pretrained weights (the shipped FashionGrid file: 10 classes) are checked the same way
    with pytest.raises(ValueError, match=r"model\.num_classes=5 but the head of the pretrained weights"):
        build_model(FASHIONGRID_MODEL, pretrained=True, num_classes=5)
    shipped = build_model(FASHIONGRID_MODEL, pretrained=True)
    probe = build_model(FASHIONGRID_MODEL, pretrained=True, num_classes=5, reset_head=True)
    assert probe.num_classes == 5 and same_weights(probe.model, shipped.model, skip=("head.",))


def test_reset_head_is_a_model_config_key_recorded_in_the_config(compose_cfg) -> None:
    cfg = compose_cfg("model.num_classes=5", "model.reset_head=true")
    assert cfg.model.reset_head is True and compose_cfg().model.reset_head is False


def test_augreg_npz_loads_through_timms_npz_loader(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_224", depth=2, num_classes=7)
    path = write_augreg_npz(source, tmp_path / "ViT-S_16.npz")
    model = build_model("vit_small_patch16_224.augreg_in21k_ft_in1k", weights=str(path), kwargs=dict(depth=2))
    assert model.num_classes == 7 and same_weights(model.model, source)
    images = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(model(images), source(model.normalize(images)), rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"num_classes=1000 but the head of .*ViT-S_16\.npz has 7 classes"):
        build_model("vit_small_patch16_224", weights=str(path), num_classes=1000, kwargs=dict(depth=2))
    with pytest.raises(ValueError, match=r"does not fit.*checkpoint has 2 transformer blocks, the model 1"):
        build_model("vit_small_patch16_224", weights=str(path), kwargs=dict(depth=1))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"not a valid \.npz checkpoint: .*bad\.npz"):
        build_model("vit_small_patch16_224", weights=str(tmp_path / "bad.npz"), kwargs=dict(depth=1))


def test_pretrained_downloads_through_timm_and_the_hub_when_online(tmp_path, monkeypatch) -> None:
    """Online, timm fetches the weights with huggingface_hub's `hf_hub_download` (faked here: it writes a tiny
    ViT's safetensors into a cache folder, as the hub client does); `HF_HUB_OFFLINE=1` refuses a missing cache
    with the message saying how to provide the weights, before any download."""
    import huggingface_hub.constants
    import timm.models._hub as timm_hub
    from huggingface_hub.errors import EntryNotFoundError

    torch.manual_seed(0)
    hub_model = timm.create_model("test_vit")
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        if filename != "model.safetensors":
            raise EntryNotFoundError(f"{repo_id}/{filename}")
        folder = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0"
        folder.mkdir(parents=True, exist_ok=True)
        return str(save_weights(hub_model, folder / filename))

    monkeypatch.setattr(timm_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model = build_model("test_vit.r160_in1k", pretrained=True)
    assert calls == [("timm/test_vit.r160_in1k", "model.safetensors")]
    assert same_weights(model.model, hub_model)

    calls.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*model\.weights="
    ):
        build_model("test_vit.r160_in1k", pretrained=True)
    assert calls == []


def test_checkpoint_of_another_architecture_names_the_differing_keys(tmp_path) -> None:
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_distilled_patch16_224", depth=1)
    path = save_weights(deit, tmp_path / "deit_small_distilled.safetensors")
    with pytest.raises(ValueError) as err:
        build_model("vit_small_patch16_224.augreg_in21k_ft_in1k", weights=str(path), kwargs=dict(depth=1))
    message = str(err.value)
    assert "does not fit 'vit_small_patch16_224.augreg_in21k_ft_in1k'" in message
    assert "keys only in the checkpoint: dist_token, head_dist.bias, head_dist.weight" in message
    assert "pos_embed (checkpoint [1, 198, 384], model [1, 197, 384])" in message

    wider = timm.create_model("vit_base_patch16_224", depth=1)
    with pytest.raises(ValueError, match=r"does not fit.*different shapes: blocks\.0\.attn\.proj\.bias"):
        build_model(
            "vit_small_patch16_224",
            weights=str(save_weights(wider, tmp_path / "b.safetensors")),
            kwargs=dict(depth=1),
        )


class WritesAFile:
    """A pickle payload that would create a file if unpickled without `weights_only=True`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_files_that_are_no_checkpoint_are_named_and_pickles_stay_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **SMALL)
    good_st = save_weights(model, tmp_path / "good.safetensors")
    torch.save(model.state_dict(), tmp_path / "good.pth")
    files = {
        "random.safetensors": np.random.default_rng(0).bytes(4096),
        "random.pth": np.random.default_rng(1).bytes(4096),
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "truncated.pth": (tmp_path / "good.pth").read_bytes()[:10_000],
        "empty.bin": b"",
    }
    marker = tmp_path / "code-ran"
    torch.save(
        {"model": model.state_dict(), "args": argparse.Namespace(x=1), "x": WritesAFile(marker)},
        tmp_path / "pickle.pth",
    )
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in [*files, "pickle.pth"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=rf"not a valid safetensors / PyTorch checkpoint: {path}"):
            build_model("vit_tiny_patch16_224", weights=str(path), kwargs=SMALL)
    assert not marker.exists()
    loaded = build_model("vit_tiny_patch16_224", weights=str(tmp_path / "good.pth"), kwargs=SMALL)
    assert same_weights(loaded.model, model)
