"""The FashionGrid ViT: a tiny timm VisionTransformer (56 px, patch 7 -> 8x8 tokens, 6 blocks, width 128).

Registered in timm's model registry as `vit_fashiongrid_patch7_56`, so `timm.create_model` builds it like any
other ViT; `pretrained=True` loads the weights shipped in `caap/assets/` (safetensors, trained multi-label by
`python -m caap.train`, see the model card JSON beside them).
"""

from __future__ import annotations

from pathlib import Path

from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FASHIONGRID_MODEL = "vit_fashiongrid_patch7_56"
FASHIONGRID_WEIGHTS = ASSETS / f"{FASHIONGRID_MODEL}.safetensors"
FASHIONGRID_CARD = ASSETS / f"{FASHIONGRID_MODEL}.json"
FASHIONGRID_MEAN = (0.2, 0.2, 0.2)
FASHIONGRID_STD = (0.3, 0.3, 0.3)
FASHIONGRID_ARCH = dict(
    img_size=56, patch_size=7, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=10
)

default_cfgs = generate_default_cfgs(
    {
        f"{FASHIONGRID_MODEL}.caap": {
            "file": str(FASHIONGRID_WEIGHTS),
            "num_classes": 10,
            "input_size": (3, 56, 56),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": FASHIONGRID_MEAN,
            "std": FASHIONGRID_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
        }
    }
)


@register_model
def vit_fashiongrid_patch7_56(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny-ish for 56x56 FashionGrid images (2x2 Fashion-MNIST grids), 10 multi-label outputs."""
    args = {**FASHIONGRID_ARCH, **kwargs}
    return build_model_with_cfg(
        VisionTransformer,
        FASHIONGRID_MODEL,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **args,
    )
