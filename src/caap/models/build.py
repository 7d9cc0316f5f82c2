"""`build_model`: a timm ViT by name, with local weights, head size and fused attention chosen by config."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch

import caap.models.fashiongrid  # noqa: F401  (registers vit_fashiongrid_patch7_56 with timm)
from caap.models.vit import ViTClassifier

log = logging.getLogger(__name__)


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every timm attention module of `model` between fused SDPA and the explicit softmax(QK^T)V."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def build_model(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int | None = None,
    fused_attn: bool = True,
    img_size: int | None = None,
    dynamic_img_size: bool = False,
    multilabel: bool = False,
    class_names: Sequence[str] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> ViTClassifier:
    """Build a timm ViT-family model wrapped as a `ViTClassifier` in eval mode.

    Args:
        name: a timm model name (`timm.list_models()`), e.g. `vit_base_patch16_224` or `vit_fashiongrid_patch7_56`.
        pretrained: load the model's pretrained weights (its `pretrained_cfg`: the shipped file for the
            FashionGrid model, otherwise the Hugging Face cache; nothing is downloaded offline).
        weights: a local checkpoint (safetensors or a torch file) to load instead; implies pretrained.
        num_classes: override the head size (a fresh head when it differs from the checkpoint).
        fused_attn: use fused scaled-dot-product attention; methods that read attention matrices switch it
            off inside themselves.
        img_size, dynamic_img_size: passed to timm (position embeddings are resampled as timm does).
        multilabel: sigmoid instead of softmax probabilities.
        class_names: names of the output classes, for tables and media.
        kwargs: any further keyword arguments for `timm.create_model`.
    """
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"model '{name}' is not a timm model name; similar names: {close or 'none'}")
    extra: dict[str, Any] = dict(kwargs or {})
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if img_size is not None:
        extra["img_size"] = img_size
    if dynamic_img_size:
        extra["dynamic_img_size"] = True
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights='{weights}' is not a file")
        extra["pretrained_cfg_overlay"] = dict(file=str(path))
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **extra)
    except (RuntimeError, OSError, ValueError) as err:
        if pretrained and weights is None:
            raise RuntimeError(
                f"could not load pretrained weights for '{name}' offline ({err}). Put them in the Hugging Face "
                f"cache (HF_HOME) on a machine with access and copy it here, or pass a local file with "
                f"model.weights=/path/to/weights.safetensors; model.pretrained=false gives random weights."
            ) from err
        raise
    set_fused_attn(model, fused_attn)
    cfg = model.pretrained_cfg
    wrapped = ViTClassifier(
        model,
        mean=cfg.get("mean", (0.5, 0.5, 0.5)),
        std=cfg.get("std", (0.5, 0.5, 0.5)),
        multilabel=multilabel,
        name=name,
        class_names=class_names,
    )
    return wrapped.eval()


def model_depth(model_cfg: Any) -> int:
    """Number of blocks L of the model that a `model` config (conf/model, `build_model`'s arguments) builds.

    The model is built without weights on PyTorch's meta device (no memory, no files, about 0.1 s for
    ViT-B/16), so sweeps can read the depth at config time, e.g. to expand `layers=all_pairs`.
    """
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else model_cfg
    name = node["name"]
    if name not in timm.list_models():
        raise ValueError(f"model '{name}' is not a timm model name")
    extra: dict[str, Any] = dict(node.get("kwargs") or {})
    for key in ("num_classes", "img_size"):
        if node.get(key) is not None:
            extra[key] = node[key]
    if node.get("dynamic_img_size"):
        extra["dynamic_img_size"] = True
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **extra)
    return len(model.blocks)
