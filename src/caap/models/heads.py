"""Classifier heads that replace a timm head: the DINOv2 linear classifier and a CLIP zero-shot head.

- DINOv2 (Oquab et al., 2023) linear classifiers read the final-normed CLS token concatenated with the mean of
  the patch tokens (registers excluded): `nn.Linear(2 * D, 1000)`, the official `dinov2_vitb14_reg4_linear_head.pth`
  (a state dict with `weight [1000, 2D]` and `bias [1000]`).
- CLIP (Radford et al., 2021) zero-shot: `logit_scale * normalize(proj(cls)) @ normalize(T)^T` with `T` `[C, E]`
  the mean normalised text embedding of each class over prompt templates (open_clip's
  `build_zero_shot_classifier`, the ImageNet class names and OpenAI's 80 templates).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch file (weights only); a clear error when the file is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def dinov2_linear_head(embed_dim: int, num_classes: int, weights: str | Path | None) -> nn.Linear:
    """The DINOv2 linear classifier `nn.Linear(2 * embed_dim, num_classes)` on [CLS, mean patch token].

    `weights`: the official head file (`dinov2_vitb14_reg4_linear_head.pth`: keys `weight`, `bias`, possibly
    prefixed `linear_head.`); None leaves the random initialisation (only for random-weight runs).
    """
    head = nn.Linear(2 * embed_dim, num_classes)
    if weights is not None:
        state = {k.removeprefix("linear_head."): v for k, v in load_state_file(weights).items()}
        expected = {"weight": tuple(head.weight.shape), "bias": tuple(head.bias.shape)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(
                f"model.head_weights='{weights}' holds {got}; a DINOv2 linear head on CLS + mean patch token "
                f"of width {embed_dim} needs {expected} (the official *_linear_head.pth, not *_linear4_head.pth)"
            )
        head.load_state_dict(state)
    return head


class ZeroShotHead(nn.Module):
    """CLIP zero-shot classifier: `[B, D]` pooled image features -> `[B, C]` logits.

    Args:
        proj: CLIP's image projection `D -> E` (timm's head of a CLIP image tower).
        text_embeddings: `[C, E]` class embeddings (normalised here).
        logit_scale: CLIP's temperature (100 for the OpenAI models).
    """

    text: Tensor  # [C, E] normalised class embeddings (buffer)

    def __init__(self, proj: nn.Module, text_embeddings: Tensor, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.num_classes = int(text_embeddings.shape[0])

    def forward(self, features: Tensor) -> Tensor:
        image = F.normalize(self.proj(features), dim=-1)
        return self.logit_scale * image @ self.text.to(image.dtype).T


def _open_clip_cached(model_name: str, pretrained: str) -> bool:
    """Whether open_clip's weights for (model_name, tag) are in the Hugging Face cache (no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    hub = cfg.get("hf_hub", "") if cfg else ""
    if not hub:
        return False
    repo, _, filename = hub.partition("/")
    repo = "/".join(hub.split("/")[:2])
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def clip_text_embeddings(
    class_names: Sequence[str],
    model_name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    prompts: str = "openai",
) -> tuple[Tensor, float]:
    """`([C, E] class text embeddings, logit_scale)` from open_clip's text tower.

    `pretrained`: an open_clip tag (weights from the Hugging Face cache), a local checkpoint file, or None for
    random weights (tests only). `prompts`: `openai` (80 templates) or `simple` (OpenAI's short list).
    Raises a RuntimeError saying how to provide the weights offline when they are not available locally.
    """
    import open_clip

    templates = {"openai": open_clip.OPENAI_IMAGENET_TEMPLATES, "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES}
    if prompts not in templates:
        raise ValueError(f"model.prompts='{prompts}' is not supported; allowed: {sorted(templates)}")
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        if pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            raise ValueError(
                f"model.clip_pretrained='{pretrained}' is neither a file nor an open_clip tag of {model_name} "
                f"({open_clip.list_pretrained_tags_by_model(model_name)})"
            )
        if not _open_clip_cached(model_name, pretrained):
            raise RuntimeError(
                f"CLIP zero-shot needs open_clip's {model_name} '{pretrained}' text tower, which is not in the "
                f"Hugging Face cache (HF_HOME). Copy the cache from a machine with access, or pass the checkpoint "
                f"file: model.clip_pretrained=/path/to/open_clip_pytorch_model.bin"
            )
    clip = open_clip.create_model(model_name, pretrained=pretrained)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            clip, tokenizer, list(class_names), templates[prompts], num_classes_per_batch=50
        )
    return weights.T.contiguous(), float(clip.logit_scale.exp())
