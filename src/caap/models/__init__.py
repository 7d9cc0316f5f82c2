"""Building timm ViTs and the residual-stream surface (`ViTClassifier`) methods rely on."""

from caap.models.attention import set_fused_attn
from caap.models.build import build_model, model_depth
from caap.models.embedded import FASHIONGRID_MODEL
from caap.models.vit import ViTClassifier

__all__ = ["FASHIONGRID_MODEL", "ViTClassifier", "build_model", "model_depth", "set_fused_attn"]
