"""Where LibraGrad's backward rules act in a ViT / EVA / MLP-Mixer, found by timm class.

LibraGrad (Mehri et al., CVPR 2025) rewires the backward pass at every norm, gated activation, gated-MLP
product and attention after the token embeddings. `libragrad_sites(model)` lists those modules, so that the
rules (`caap.methods.libragrad`) need no knowledge of timm's classes; a module a rule would have to handle
but none exists for raises NotImplementedError naming the model, rather than giving non-LibraGrad gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timm.layers import activations as timm_act
from timm.layers import mlp as timm_mlp
from timm.layers import norm as timm_norm
from timm.layers.attention import Attention
from timm.models.eva import EvaAttention
from torch import nn

from caap.models.vit import ViTClassifier

_GATED_ACTS: tuple[type, ...] = (
    nn.GELU,
    nn.SiLU,
    timm_act.GELU,
    timm_act.GELUTanh,
    timm_act.QuickGELU,
    timm_act.Swish,
)
"""Activations `x * g(x)` with g(0) = 1/2 (GELU erf / tanh, QuickGELU, SiLU): LibraGrad detaches the gate."""
_NO_RULE_ACTS = (nn.ReLU, nn.Identity)
_RMS_NORMS: tuple[type, ...] = tuple(
    c for c in (getattr(nn, "RMSNorm", None), timm_norm.RmsNorm, timm_norm.RmsNormFp32) if c is not None
)
_GATED_MLPS = (timm_mlp.GluMlp, timm_mlp.SwiGLU)


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and the submodules LibraGrad's attention rules hook.

    kind: `qkv` (timm `Attention`: one qkv projection, fused SDPA or the explicit path) or `rotary` (EVA02's
        `EvaAttention`: q and k normed before the rotary embedding). q_norm / k_norm run on q and k
        `[B, heads, T, d]` (Identity without qk-norm); out_norm is the first module after the attention
        product (`[B, T, heads * d]`); gate is the sigmoid output gate (None without one).
    qkv, num_heads, head_dim, scale: for `qkv` sites, what the value-only backward needs.
    """

    module: nn.Module
    kind: Literal["qkv", "rotary"]
    q_norm: nn.Module
    k_norm: nn.Module
    out_norm: nn.Module
    gate: nn.Module | None
    qkv: nn.Module | None = None
    num_heads: int = 0
    head_dim: int = 0
    scale: float = 1.0


@dataclass(frozen=True)
class LibraGradSites:
    """The modules of a model that LibraGrad's rules act on, each list in module order.

    norms: `(module, centred)`: LayerNorm (centred) or RMSNorm. gated_activations: activations whose gate the
    rule detaches. gated_mlp_products: the modules whose output is a gated MLP's gate product (`drop1` of
    GluMlp / SwiGLU). attentions: the attention modules.
    """

    norms: list[tuple[nn.Module, bool]]
    gated_activations: list[nn.Module]
    gated_mlp_products: list[nn.Module]
    attentions: list[AttentionSite]


def _attention_site(m: nn.Module) -> AttentionSite | None:
    gate = getattr(m, "gate", None)
    if type(m) is Attention:
        return AttentionSite(
            m, "qkv", m.q_norm, m.k_norm, m.norm, gate, m.qkv, m.num_heads, m.head_dim, float(m.scale)
        )
    if type(m) is EvaAttention:
        return AttentionSite(m, "rotary", m.q_norm, m.k_norm, m.norm, gate)
    return None


def libragrad_sites(model: ViTClassifier) -> LibraGradSites:
    """The LibraGrad sites among `model.modules_after_embedding()` (the blocks, final norm, head, classifier).

    Raises NotImplementedError for a normalisation, activation or attention module no rule exists for.
    """
    name = model.name
    modules = [m for part in model.modules_after_embedding() for m in part.modules()]
    norms: list[tuple[nn.Module, bool]] = []
    for m in modules:
        if isinstance(m, nn.LayerNorm):
            norms.append((m, True))
        elif _RMS_NORMS and isinstance(m, _RMS_NORMS):
            norms.append((m, False))
        elif "norm" in type(m).__name__.lower() and not isinstance(m, nn.Identity):
            raise NotImplementedError(
                f"LibraGrad on model '{name}': no rule for the normalisation layer {type(m).__name__}; "
                f"supported: LayerNorm, RMSNorm"
            )
    gated_acts: list[nn.Module] = []
    products: list[nn.Module] = []
    for m in modules:
        if isinstance(m, _GATED_MLPS):
            products.append(m.drop1)
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module) and not isinstance(act, _NO_RULE_ACTS):
            if not isinstance(act, _GATED_ACTS):
                raise NotImplementedError(
                    f"LibraGrad on model '{name}': no gate rule for the activation {type(act).__name__} in "
                    f"{type(m).__name__}; supported: GELU (erf, tanh), QuickGELU, SiLU, ReLU"
                )
            gated_acts.append(act)
    attentions: list[AttentionSite] = []
    for m in modules:
        site = _attention_site(m)
        if site is not None:
            attentions.append(site)
        elif "attention" in type(m).__name__.lower() or hasattr(m, "fused_attn"):
            raise NotImplementedError(
                f"LibraGrad on model '{name}': no rule for the attention module {type(m).__name__}; "
                f"supported: timm.layers.Attention (ViT, DeiT, DeiT3, DINOv2, CLIP), EvaAttention (EVA02)"
            )
    return LibraGradSites(norms, gated_acts, products, attentions)
