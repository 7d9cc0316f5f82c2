"""LibraGrad (Mehri et al., CVPR 2025): backward-only gradient rules that restore FullGrad-completeness in ViTs.

`libragrad(model, rules)` is a context manager that rewires the backward pass of a timm ViT and restores the
model on exit, even when the body raises. Forward values never change: every rule replaces a module's output
`y` by a tensor with the value of `y` (a view of it) and the gradient of the rule, i.e. the official code's
`swap_backward(y, b)` (value of `y`, gradient of `b`), written as small autograd Functions whose backward
applies the rule's Jacobian directly, so that nothing extra is computed in forward. The rules are installed
as forward hooks; nothing is monkey-patched and nothing is left behind. Hooks act only while autograd records (under `torch.no_grad()` they return the module output untouched).

Rules (REFERENCE.md section 1, from the official code, where LibraGrad is called "FairGrad"):

- attention: q and k detached (hooks on `attn.q_norm` / `attn.k_norm`, which timm always calls, `nn.Identity`
  without qk-norm), so the attention matrix is a constant in backward and the gradient flows through V only.
  This works with fused SDPA on: the kernel just receives q and k that do not require grad. A sigmoid output
  gate (timm `gated=True`) is detached like an activation gate.
- LayerNorm: sigma detached, the mean stays differentiable (LN is affine in backward). RMSNorm: the RMS
  detached (the analogous rule; the official code has none).
- GELU / SiLU / QuickGELU: the gate detached, `x * Phi(x).detach()` (tanh form for `approximate='tanh'`),
  `x * sigmoid(x).detach()`, `x * sigmoid(1.702 x).detach()`. ReLU needs no rule.
- gated MLP (GluMlp / SwiGLU): the gradient of the gate product x 1/2. The official code applies it only to
  EVA02, gMixer and DINOv2-giant, i.e. the models that have such an MLP; so do we (no gated MLP, no effect).
- head: the differentiated target is the target probability ("S1", preset `full`) or the logit ("S0").
  The head itself is untouched: `LibraGradRules.head` tells methods which score to differentiate.
- residual, LayerScale, pooling, linear layers: unchanged.

Presets: `full` (= `true`), the ablations `wo_att`, `wo_ln`, `wo_act`, `wo_gate`, `wo_head` (full with a
logit head, the completeness setting), and `attnlrp` (AttnLRP as a modified gradient: LN sigma detached, GELU
gate detached, normal softmax gradient with the attention-matrix gradient x 1/4, V gradient x 1/2, logit head).

Unsupported modules (other attention classes, unknown norms or activations inside the blocks) raise a clear
error naming the model rather than silently giving non-LibraGrad gradients.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from timm.layers import activations as timm_act
from timm.layers import mlp as timm_mlp
from timm.layers import norm as timm_norm
from timm.layers.attention import Attention
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "LibraGradRules",
    "libragrad",
    "resolve_libragrad",
    "resolve_score",
    "swap_backward",
]


def swap_backward(fwd: Tensor, bwd: Tensor) -> Tensor:
    """The value of `fwd` with the gradient of `bwd`: `fwd.detach() + (bwd - bwd.detach())`.

    For finite `bwd` the added term is exactly zero, so the value is bit-identical to `fwd`."""
    return fwd.detach() + (bwd - bwd.detach())


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """`x` in forward, gradient multiplied by `factor` in backward (`swap_backward(x, x * factor)`)."""
    return _ScaleGrad.apply(x, factor)


@dataclass(frozen=True)
class LibraGradRules:
    """Which backward rules are on.

    attention: `detach_qk` (LibraGrad), `attnlrp` (q/k gradient x `qk_scale`, attention output gradient x
        `out_scale`: with the defaults, attention-matrix gradient x 1/4 and V gradient x 1/2) or `none`.
    layernorm: detach sigma (LayerNorm) / the RMS (RMSNorm).
    activation: detach the GELU / SiLU gate.
    gated_mlp: gate-product gradient x 1/2 in GluMlp / SwiGLU.
    head: `prob` (S1) or `logit` (S0), the score methods differentiate by default.
    """

    name: str = "full"
    attention: str = "detach_qk"
    layernorm: bool = True
    activation: bool = True
    gated_mlp: bool = True
    head: str = "prob"
    qk_scale: float = 0.5
    out_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.attention not in ("detach_qk", "attnlrp", "none"):
            raise ValueError(
                f"LibraGrad attention rule '{self.attention}': allowed detach_qk | attnlrp | none"
            )
        if self.head not in ("prob", "logit"):
            raise ValueError(f"LibraGrad head '{self.head}': allowed prob | logit")


_FULL = LibraGradRules()
PRESETS: dict[str, LibraGradRules] = {
    "full": _FULL,
    "wo_att": replace(_FULL, name="wo_att", attention="none"),
    "wo_ln": replace(_FULL, name="wo_ln", layernorm=False),
    "wo_act": replace(_FULL, name="wo_act", activation=False),
    "wo_gate": replace(_FULL, name="wo_gate", gated_mlp=False),
    "wo_head": replace(_FULL, name="wo_head", head="logit"),
    "attnlrp": replace(_FULL, name="attnlrp", attention="attnlrp", head="logit"),
}
_OFF = (False, None, "false", "off", "none", "no", "plain")
_ON = (True, "true", "on", "yes", "libragrad")


def resolve_libragrad(libragrad: bool | str | LibraGradRules | None) -> LibraGradRules | None:
    """`method.libragrad` to rules: false/null -> None (plain gradients), true -> `full`, or a preset name."""
    if isinstance(libragrad, LibraGradRules):
        return libragrad
    key = libragrad.lower() if isinstance(libragrad, str) else libragrad
    if key in _OFF:
        return None
    if key in _ON:
        return PRESETS["full"]
    if isinstance(key, str) and key in PRESETS:
        return PRESETS[key]
    raise ValueError(
        f"method.libragrad={libragrad!r} is not supported; allowed: false, true, or a preset {sorted(PRESETS)}"
    )


SCORES = ("logit", "prob")


def resolve_score(score: str | None, rules: LibraGradRules | None, method: str = "method") -> str:
    """The differentiated score: explicit `score`, else the preset's head (LibraGrad) or the logit (plain)."""
    if score is None:
        return rules.head if rules is not None else "logit"
    if score not in SCORES:
        raise ValueError(f"method.score='{score}' is not supported; allowed: {list(SCORES)} or null")
    return score


# -- the rules as output substitutions -----------------------------------------------------------------


def _low_precision(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _FrozenScaleNorm(torch.autograd.Function):
    """Value: the norm module's own output `y`. Backward: the norm with its scale held constant.

    LayerNorm (`center`): `y = (x - mean x) / sigma * w + b` with sigma constant, so
    `dx = (gw - mean gw) / sigma`, `gw = dy * w`. RMSNorm: `y = x / rms * w` with rms constant, `dx = gw / rms`.
    Equivalent to `swap_backward(y, rule(x))` but computes nothing extra in forward."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, ndim: int, eps: float, center: bool):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.ndim, ctx.eps, ctx.center = ndim, eps, center
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dims = tuple(range(-ctx.ndim, 0))
        xf, gf = _low_precision(x), _low_precision(grad)
        if ctx.center:  # one fused pass for x_hat and 1 / sigma
            xhat, _, rstd = torch.native_layer_norm(xf, xf.shape[x.ndim - ctx.ndim :], None, None, ctx.eps)
        else:
            rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + ctx.eps)
            xhat = None
        gw = gf * weight.to(gf.dtype) if weight is not None else gf
        if ctx.center:
            gw = gw - gw.mean(dims, keepdim=True)
        gx = (gw * rstd).to(x.dtype)
        lead = tuple(range(x.ndim - ctx.ndim))
        gweight = gbias = None
        if weight is not None and ctx.needs_input_grad[2]:
            xhat = xf * rstd if xhat is None else xhat
            gweight = (gf * xhat).sum(lead).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            gbias = gf.sum(lead).to(x.dtype)
        return gx, None, gweight, gbias, None, None, None


class _DetachedGate(torch.autograd.Function):
    """Value: the activation's own output `y = x * g(x)`. Backward: `dx = dy * g(x)` (the gate a constant)."""

    @staticmethod
    def forward(ctx, x, y, gate):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.gate = gate
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ctx.gate(x), None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.factor, None


def _norm_hook(center: bool) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(out, Tensor):
            return None
        shape = module.normalized_shape
        ndim = 1 if isinstance(shape, int) else len(shape)
        eps = module.eps if module.eps is not None else torch.finfo(out.dtype).eps
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return _FrozenScaleNorm.apply(args[0], out.detach(), weight, bias, ndim, eps, center)

    return hook


def _gate_hook(gate: Callable[[Tensor], Tensor]) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(out, Tensor):
            return None
        return _DetachedGate.apply(args[0], out.detach(), gate)

    return hook


def _gelu_gate(x: Tensor, approximate: str) -> Tensor:
    if approximate == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return torch.special.ndtr(x)  # Phi(x) = 0.5 (1 + erf(x / sqrt 2)), one kernel


def _activation_gate(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The gate g with act(x) = x * g(x), or None for activations that need no rule (ReLU, Identity)."""
    if isinstance(module, nn.GELU):
        return lambda x: _gelu_gate(x, module.approximate)
    if isinstance(module, timm_act.GELUTanh):
        return lambda x: _gelu_gate(x, "tanh")
    if isinstance(module, timm_act.GELU):
        return lambda x: _gelu_gate(x, "none")
    if isinstance(module, timm_act.QuickGELU):
        return lambda x: torch.sigmoid(1.702 * x)
    if isinstance(module, (nn.SiLU, timm_act.Swish)):
        return torch.sigmoid
    return None


_NO_RULE_ACTS = (nn.ReLU, nn.Identity)
_RMS_NORMS: tuple[type, ...] = tuple(
    c for c in (getattr(nn, "RMSNorm", None), timm_norm.RmsNorm, timm_norm.RmsNormFp32) if c is not None
)
_GATED_MLPS = (timm_mlp.GluMlp, timm_mlp.SwiGLU)

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _detach_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
    return out.detach() if torch.is_grad_enabled() else None


def _scale_hook(factor: float) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        return scale_grad(out, factor) if torch.is_grad_enabled() and out.requires_grad else None

    return hook


def _plan(model: nn.Module, rules: LibraGradRules) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """(module, forward hook) pairs in installation order; raises on modules the rules cannot handle."""
    name = getattr(model, "name", type(model).__name__)
    root = getattr(model, "model", model)
    scope = [root.blocks] + [getattr(root, n) for n in ("norm", "fc_norm", "head") if hasattr(root, n)]
    modules = [m for part in scope for m in part.modules()]
    plan: list[tuple[nn.Module, Callable[..., Any]]] = []
    # 1) norms first, so that the attention hooks on q_norm / k_norm see their substituted output
    for m in modules:
        if isinstance(m, nn.LayerNorm):
            if rules.layernorm:
                plan.append((m, _norm_hook(center=True)))
        elif _RMS_NORMS and isinstance(m, _RMS_NORMS):
            if rules.layernorm:
                plan.append((m, _norm_hook(center=False)))
        elif "norm" in type(m).__name__.lower() and not isinstance(m, nn.Identity):
            raise NotImplementedError(
                f"LibraGrad on model '{name}': no rule for the normalisation layer {type(m).__name__}; "
                f"supported: LayerNorm, RMSNorm"
            )
    # 2) activations and gated MLPs
    for m in modules:
        if isinstance(m, _GATED_MLPS) and rules.gated_mlp:
            plan.append((m.drop1, _scale_hook(0.5)))
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module) and not isinstance(act, _NO_RULE_ACTS):
            gate = _activation_gate(act)
            if gate is None:
                raise NotImplementedError(
                    f"LibraGrad on model '{name}': no gate rule for the activation {type(act).__name__} in "
                    f"{type(m).__name__}; supported: GELU (erf, tanh), QuickGELU, SiLU, ReLU"
                )
            if rules.activation:
                plan.append((act, _gate_hook(gate)))
    # 3) attention
    for m in modules:
        if type(m) is Attention:
            if getattr(m, "gate", None) is not None and rules.activation:
                plan.append((m.gate, _detach_hook))
            if rules.attention == "detach_qk":
                plan += [(m.q_norm, _detach_hook), (m.k_norm, _detach_hook)]
            elif rules.attention == "attnlrp":
                plan += [(m.q_norm, _scale_hook(rules.qk_scale)), (m.k_norm, _scale_hook(rules.qk_scale))]
                plan.append((m.norm, _scale_hook(rules.out_scale)))
        elif "attention" in type(m).__name__.lower() or hasattr(m, "fused_attn"):
            raise NotImplementedError(
                f"LibraGrad on model '{name}': no rule for the attention module {type(m).__name__}; "
                f"supported: timm.layers.Attention (ViT, DeiT, DeiT3, DINOv2, CLIP)"
            )
    return plan


@contextmanager
def libragrad(
    model: nn.Module, rules: bool | str | LibraGradRules | None = "full"
) -> Iterator[LibraGradRules | None]:
    """Rewire the backward pass of `model` (a `ViTClassifier` or timm ViT) with LibraGrad rules.

    Yields the rules (None when `rules` is false: a no-op, so methods can always enter it). Forward outputs are
    bit-identical; all hooks are removed on exit, even on exceptions. Not re-entrant on the same model.
    """
    resolved = resolve_libragrad(rules)
    if resolved is None:
        yield None
        return
    if model in _ACTIVE:
        raise RuntimeError(
            "libragrad(): already active on this model (nested contexts would stack the rules)"
        )
    plan = _plan(model, resolved)
    handles = []
    _ACTIVE.add(model)
    try:
        for module, hook in plan:
            handles.append(module.register_forward_hook(hook))
        yield resolved
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(model)


def score_of(logits: Tensor, target: Tensor, score: str, multilabel: bool) -> Tensor:
    """Target score `[B]`: the logit, or the probability (sigmoid for multi-label heads, else softmax)."""
    if score == "logit":
        return logits.gather(1, target[:, None]).squeeze(1)
    picked = logits.sigmoid() if multilabel else logits.softmax(-1)
    return picked.gather(1, target[:, None]).squeeze(1)
