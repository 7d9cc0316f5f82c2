"""caap's embedded benchmark ViTs, registered in timm's model registry with weights shipped in `caap/assets/`.

- `vit_fashiongrid_patch7_56`: 56 px, patch 7 -> 8x8 tokens, 6 blocks, width 128, 4 heads (FashionGrid 2x2 grids).
- `vit_fashionscenes_patch14_112`: 112 px, patch 14 -> 8x8 tokens, 12 blocks, width 192, 3 heads (timm's ViT-Tiny
  layout; FashionScenes textured scenes).

Both are plain timm `VisionTransformer`s with a CLS token, trained multi-label over the 10 Fashion-MNIST classes by
`python -m caap.train` (the model card JSON beside each weights file gives the command, the training time and the
test mAP). `timm.create_model(name, pretrained=True)` loads the shipped safetensors like any timm checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class EmbeddedModel:
    """One shipped model: its timm name, architecture keyword arguments and normalisation."""

    name: str
    arch: dict[str, Any] = field(hash=False)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def weights(self) -> Path:
        return ASSETS / f"{self.name}.safetensors"

    @property
    def card(self) -> Path:
        return ASSETS / f"{self.name}.json"

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained config: the local weights file, input size and normalisation."""
        size = self.arch["img_size"]
        return {
            "file": str(self.weights),
            "num_classes": self.arch["num_classes"],
            "input_size": (3, size, size),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": self.mean,
            "std": self.std,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
        }

    def build(self, pretrained: bool, **kwargs: Any) -> VisionTransformer:
        """The timm model; keyword arguments override the architecture (e.g. `num_classes`)."""
        return build_model_with_cfg(
            VisionTransformer,
            self.name,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **{**self.arch, **kwargs},
        )


FASHIONGRID = EmbeddedModel(
    name="vit_fashiongrid_patch7_56",
    arch=dict(img_size=56, patch_size=7, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=10),
    mean=(0.2, 0.2, 0.2),
    std=(0.3, 0.3, 0.3),
)
FASHIONSCENES = EmbeddedModel(
    name="vit_fashionscenes_patch14_112",
    arch=dict(
        img_size=112, patch_size=14, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=10
    ),
    mean=(0.5, 0.5, 0.5),  # the scenes' pixel statistics: mean ~0.48, std ~0.26 per channel
    std=(0.25, 0.25, 0.25),
)
EMBEDDED_MODELS = (FASHIONGRID, FASHIONSCENES)

FASHIONGRID_MODEL = FASHIONGRID.name
FASHIONGRID_WEIGHTS = FASHIONGRID.weights
FASHIONGRID_CARD = FASHIONGRID.card

default_cfgs = generate_default_cfgs({f"{m.name}.caap": m.pretrained_cfg() for m in EMBEDDED_MODELS})


@register_model
def vit_fashiongrid_patch7_56(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 56x56 FashionGrid images (2x2 Fashion-MNIST grids), 10 multi-label outputs."""
    return FASHIONGRID.build(pretrained, **kwargs)


@register_model
def vit_fashionscenes_patch14_112(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny layout for 112x112 FashionScenes scenes (8x8 patches of 14 px), 10 multi-label outputs."""
    return FASHIONSCENES.build(pretrained, **kwargs)
