"""`build_model`: a timm ViT / EVA / MLP-Mixer by name, with local weights, head, preprocessing and fused
attention chosen by config.

Weights: `pretrained=true` loads the model's pretrained weights (downloaded through timm / huggingface_hub into
the Hugging Face cache; under `HF_HUB_OFFLINE=1` only from the cache, with a clear error saying how to provide
them when they are missing), `weights=PATH` loads a local checkpoint instead (safetensors, a PyTorch state dict
or an AugReg / big_vision `.npz`, see `caap.models.weights`), `pretrained=false` (explicit) gives random weights.
A head of another size than the weights' is refused unless `reset_head=true` asks for a new random one.
Preprocessing (input size, crop_pct, interpolation, mean and std) comes from timm's data config of the model
(`ViTClassifier.data_config`); datasets read it so that images and masks are resized and cropped as the model
was evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

import caap.models.embedded  # noqa: F401  (registers the shipped FashionGrid and FashionScenes ViTs with timm)
from caap.models.attention import set_fused_attn
from caap.models.heads import ZeroShotHead, clip_text_embeddings, dinov2_linear_head
from caap.models.imagenet_classes import imagenet_class_names
from caap.models.vit import ViTClassifier
from caap.models.weights import (
    WeightsSource,
    check_npz_depth,
    classes_to_build,
    does_not_fit_message,
    first_sentence,
    hub_weights,
    local_weights,
    new_random_head,
)

HEADS = ("timm", "dinov2_linear", "clip_zeroshot")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

log = logging.getLogger(__name__)


def build_model(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    num_classes: int | None = None,
    reset_head: bool = False,
    fused_attn: bool = True,
    img_size: int | None = None,
    dynamic_img_size: bool = False,
    multilabel: bool = False,
    class_names: Sequence[str] | None = None,
    kwargs: dict[str, Any] | None = None,
    head: str = "timm",
    head_weights: str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    clip_model: str = "ViT-B-16",
    clip_pretrained: str | None = "openai",
    prompts: str = "openai",
) -> ViTClassifier:
    """Build a timm ViT-family model wrapped as a `ViTClassifier` in eval mode.

    Args:
        name: a timm model name (`timm.list_models()`), e.g. `vit_base_patch16_224` or `vit_fashiongrid_patch7_56`.
        pretrained: load the model's pretrained weights (its `pretrained_cfg`: the shipped file for the
            FashionGrid model, otherwise the Hugging Face Hub through its cache; under `HF_HUB_OFFLINE=1` the
            cache only).
        weights: a local checkpoint to load instead (safetensors, a PyTorch state dict read with
            `weights_only=True`, or an AugReg / big_vision `.npz`); implies pretrained.
        num_classes: the head size; None: the weights' own. With weights whose head has another size it is an
            error unless `reset_head`.
        reset_head: replace the weights' head by a new random head of `num_classes` outputs (for a linear probe
            or fine-tuning; a run that evaluates attributions of a random head is rarely what is meant).
        fused_attn: use fused scaled-dot-product attention; methods that read attention matrices switch it
            off inside themselves.
        img_size, dynamic_img_size: passed to timm (position embeddings are resampled as timm does).
        multilabel: sigmoid instead of softmax probabilities.
        class_names: names of the output classes, for tables and media.
        kwargs: any further keyword arguments for `timm.create_model`.
        head: `timm` (the model's own head), `dinov2_linear` (a linear classifier on the CLS token and the mean
            patch token, DINOv2's linear evaluation; weights from `head_weights`) or `clip_zeroshot` (CLIP
            zero-shot logits from open_clip text embeddings of the class names; the timm model must be a CLIP
            image tower whose head is the projection, e.g. `vit_base_patch16_clip_224.openai`).
        head_weights: the DINOv2 linear head file (`dinov2_vitb14_reg4_linear_head.pth`); required with
            `pretrained`.
        crop_pct, interpolation: override the data config's centre-crop fraction and resize interpolation.
        clip_model, clip_pretrained, prompts: open_clip model name, tag or checkpoint file, and prompt set
            (`openai`: 80 templates, `simple`) for `clip_zeroshot`.
    """
    if head not in HEADS:
        raise ValueError(f"model.head='{head}' is not supported; allowed: {list(HEADS)}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"model.crop_pct={crop_pct} must lie in (0, 1]")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"model.interpolation='{interpolation}' is not supported; allowed: {list(INTERPOLATIONS)}"
        )
    arch, _, tag = name.partition(".")
    if arch not in timm.list_models() or (tag and name not in timm.list_models(arch, pretrained=True)):
        close = timm.list_models(f"*{arch.split('_')[0]}*", pretrained=bool(tag))[:8]
        raise ValueError(f"model '{name}' is not a timm model name; similar names: {close or 'none'}")
    extra: dict[str, Any] = dict(kwargs or {})
    if img_size is not None:
        extra["img_size"] = img_size
    if dynamic_img_size:
        extra["dynamic_img_size"] = True
    source: WeightsSource | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights='{weights}' is not a file")
        source, pretrained = local_weights(path, name), True
    if head == "dinov2_linear" and pretrained and head_weights is None:
        raise RuntimeError(
            f"model '{name}' with head=dinov2_linear needs the linear classifier's weights: pass the official "
            f"head file, model.head_weights=/path/to/dinov2_vitb14_reg4_linear_head.pth (or "
            f"model.pretrained=false for random weights)"
        )
    text, scale = None, 100.0
    if head == "clip_zeroshot":  # the text tower first: a missing checkpoint fails before image weights load
        class_names = list(class_names) if class_names is not None else list(imagenet_class_names())
        if pretrained:
            text, scale = clip_text_embeddings(class_names, clip_model, clip_pretrained, prompts)
    if pretrained and source is None:
        source = hub_weights(name)
    build_classes, replace_head = num_classes, False  # other heads replace the timm head, whatever its size
    if head == "timm":
        build_classes, replace_head = classes_to_build(num_classes, source, reset_head)
    if build_classes is not None:
        extra["num_classes"] = build_classes
    if source is not None and source.overlay is not None:
        overlay = dict(source.overlay)
        if build_classes is not None:  # timm drops (and loads non-strictly) a head of another size than this
            overlay["num_classes"] = build_classes
        extra["pretrained_cfg_overlay"] = overlay
    model = create_timm_model(name, pretrained, extra, source)
    if source is not None and source.path is not None and source.path.suffix == ".npz":
        check_npz_depth(model, source.path, name)
    if replace_head and source is not None:
        new_random_head(model, num_classes if num_classes is not None else int(model.num_classes), source)
    set_fused_attn(model, fused_attn)
    data_config = model_data_config(model, crop_pct, interpolation)
    pooling: str | None = None
    classifier: torch.nn.Module | None = None
    if head == "dinov2_linear":
        pooling = "token+avg"
        classifier = dinov2_linear_head(int(model.embed_dim), num_classes or 1000, head_weights)
    elif head == "clip_zeroshot":
        proj = getattr(model, "head", None)
        if not isinstance(proj, torch.nn.Linear) or getattr(model, "global_pool", None) != "token":
            raise ValueError(
                f"model.head=clip_zeroshot needs a CLIP image tower whose head is the projection and which "
                f"pools the CLS token (e.g. vit_base_patch16_clip_224.openai); '{name}' is not one"
            )
        if text is None:  # random weights (explicitly asked for): random class embeddings, no text tower
            log.warning("model '%s': random weights, so random CLIP class embeddings", name)
            text = torch.randn(len(class_names or ()), proj.out_features)
        if text.shape[1] != proj.out_features:
            raise ValueError(
                f"open_clip {clip_model} text embeddings have width {text.shape[1]}, but '{name}' projects "
                f"images to {proj.out_features}: use the matching CLIP image tower"
            )
        classifier = ZeroShotHead(proj, text, scale)
    wrapped = ViTClassifier(
        model,
        mean=data_config["mean"],
        std=data_config["std"],
        multilabel=multilabel,
        name=name,
        class_names=class_names,
        pooling=pooling,
        classifier=classifier,
    )
    if wrapped.class_names is None and wrapped.num_classes == 1000 and not multilabel:
        wrapped.class_names = list(imagenet_class_names())
    wrapped.data_config = data_config
    return wrapped.eval()


def create_timm_model(
    name: str, pretrained: bool, extra: dict[str, Any], source: WeightsSource | None
) -> Any:
    """`timm.create_model(name, pretrained, **extra)` with messages that say what went wrong: local weights that
    do not fit the architecture (which keys and shapes differ), hub weights that could not be fetched."""
    try:
        return timm.create_model(name, pretrained=pretrained, **extra)
    except (RuntimeError, OSError, ValueError, KeyError, AssertionError, AttributeError) as err:
        if source is None or not pretrained:
            raise
        if source.path is not None:
            model_extra = {k: v for k, v in extra.items() if k != "pretrained_cfg_overlay"}
            with torch.device("meta"):
                reference = timm.create_model(name, pretrained=False, **model_extra)
            shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
            raise ValueError(does_not_fit_message(source, name, shapes, err)) from err
        raise RuntimeError(
            f"could not load the pretrained weights of '{name}' ({first_sentence(err)}). Without "
            f"network access, put them in the Hugging Face cache (HF_HOME) on a machine with access and copy it "
            f"here, or pass a local file with model.weights=/path/to/weights.safetensors; "
            f"model.pretrained=false gives random weights."
        ) from err


def model_data_config(
    model: torch.nn.Module, crop_pct: float | None = None, interpolation: str | None = None
) -> dict[str, Any]:
    """timm's data config of `model` (input_size, interpolation, mean, std, crop_pct, crop_mode) at the size the
    model was built for (an `img_size` override changes the input size, not the pretrained config's)."""
    config = dict(resolve_model_data_config(model))
    pe = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        config["input_size"] = (3, *tuple(pe.img_size))
    if crop_pct is not None:
        config["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        config["interpolation"] = interpolation
    return config


def model_depth(model_cfg: Any) -> int:
    """Number of blocks L of the model that a `model` config (conf/model, `build_model`'s arguments) builds.

    The model is built without weights on PyTorch's meta device (no memory, no files, about 0.1 s for
    ViT-B/16), so sweeps can read the depth at config time, e.g. to expand `layers=all_pairs`.
    """
    from omegaconf import OmegaConf

    node: Any = (
        OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else model_cfg
    )
    name = node["name"]
    if not timm.is_model(name):  # accepts pretrained tags (`name.tag`)
        raise ValueError(f"model '{name}' is not a timm model name (timm.list_models())")
    extra: dict[str, Any] = dict(node.get("kwargs") or {})
    for key in ("num_classes", "img_size"):
        if node.get(key) is not None:
            extra[key] = node[key]
    if node.get("dynamic_img_size"):
        extra["dynamic_img_size"] = True
    with torch.device("meta"):
        model: Any = timm.create_model(name, pretrained=False, **extra)
    return len(model.blocks)
