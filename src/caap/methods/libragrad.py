"""LibraGrad (Mehri et al., CVPR 2025): backward-only gradient rules that restore FullGrad-completeness in ViTs.

`libragrad(model, rules)` rewires the backward pass of `model` inside a `with` block and restores it on exit,
even when the body raises. Forward values never change: each rule replaces a module's output `y` by a view of
`y` whose backward applies the rule's Jacobian (the official `swap_backward(y, b)`: value of `y`, gradient of
`b`), installed as forward hooks that act only while autograd records.

Rules: attention with q and k detached (fused SDPA kept on, with a value-only backward), LayerNorm sigma /
RMSNorm RMS detached, the GELU / SiLU / QuickGELU gate detached, the gated-MLP product's gradient x 1/2; the
head score methods differentiate is `LibraGradRules.head` (`prob` = S1, `logit` = S0). Presets: `full`
(= `true`), `wo_att`, `wo_ln`, `wo_act`, `wo_gate`, `wo_head`, and `attnlrp` (AttnLRP as a modified gradient).
Where the rules act is `caap.models.libragrad_sites` (a module with no rule raises); the rules, presets and
their official sources are in docs/libragrad.md.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from caap.models.libragrad_sites import AttentionSite, libragrad_sites
from caap.models.vit import ViTClassifier
from caap.scores import PROB_OR_LOGIT, Score

__all__ = [
    "PRESETS",
    "LibraGradRules",
    "libragrad",
    "plan_hooks",
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
        if self.head not in PROB_OR_LOGIT:
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


def resolve_score(score: str | None, rules: LibraGradRules | None) -> Score:
    """The differentiated score: explicit `score` (`prob` / `logit`), else the preset's head (LibraGrad) or the
    logit (plain gradients)."""
    if score is None:
        return cast(Score, rules.head) if rules is not None else "logit"
    if score not in PROB_OR_LOGIT:
        raise ValueError(f"method.score='{score}' is not supported; allowed: {list(PROB_OR_LOGIT)} or null")
    return score  # narrowed to a Score by the membership test


# -- the rules as output substitutions -----------------------------------------------------------------


def _low_precision(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _FrozenScaleNorm(torch.autograd.Function):
    """Value: the norm module's own output `y`. Backward: the norm with its scale held constant.

    LayerNorm (`center`): `y = (x - mean x) * rstd * w + b` with rstd constant, so `dx = (gw - mean gw) * rstd`,
    `gw = dy * w`. RMSNorm: `y = x * rstd * w` with rstd constant, `dx = gw * rstd`. Equivalent to
    `swap_backward(y, rule(x))`, but computes nothing extra in forward. For LayerNorm the backward is one
    fused kernel: ATen's own LayerNorm backward, given the rstd its forward saved and an input equal to the
    mean (zeros for both), in which x_hat = 0, which is exactly the sigma-detached rule
    `rstd * (gw - mean gw - x_hat * mean(gw * x_hat))` with the last term gone.
    The gradient flows to x only: the norm's weight and bias get none under LibraGrad (attributions need
    input gradients; a custom Function cannot tell whether a parameter gradient is wanted, and computing it
    every time cost more than the rule itself).
    """

    @staticmethod
    def forward(ctx, x, y, weight, rstd, ndim: int, eps: float, center: bool, zeros):
        ctx.save_for_backward(x, weight, rstd)
        ctx.ndim, ctx.eps, ctx.center, ctx.zeros = ndim, eps, center, zeros
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        if ctx.center and rstd is not None and rstd.dtype in (grad.dtype, torch.float32):
            zero_x = ctx.zeros(grad.shape, grad.dtype, grad.device)
            zero_mean = ctx.zeros(rstd.shape, rstd.dtype, rstd.device)
            shape = list(x.shape[x.ndim - ctx.ndim :])
            gx = torch.ops.aten.native_layer_norm_backward(
                grad, zero_x, shape, zero_mean, rstd, weight, None, [True, False, False]
            )[0]
            return gx.to(x.dtype), None, None, None, None, None, None, None
        dims = tuple(range(-ctx.ndim, 0))
        xf, gf = _low_precision(x), _low_precision(grad)
        if rstd is None:  # RMSNorm, or a LayerNorm whose forward kept no statistics
            centred = xf - xf.mean(dims, keepdim=True) if ctx.center else xf
            rstd = torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + ctx.eps)
        gw = gf * weight.to(gf.dtype) if weight is not None else gf.clone()
        if ctx.center:
            gw = gw - gw.mean(dims, keepdim=True)
        return gw.mul_(rstd).to(x.dtype), None, None, None, None, None, None, None


class _ZeroBuffers:
    """Read-only zero tensors by (shape, dtype, device), allocated once per `libragrad` context: the inputs
    of the fused LayerNorm-rule backward (`_FrozenScaleNorm`)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    def __call__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tuple(shape), dtype, device)
        if key not in self._cache:
            self._cache[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self._cache[key]


class _DetachedGate(torch.autograd.Function):
    """Value: the activation's own output `y = x * g(x)`. Backward: `dx = dy * g(x)` (the gate a constant).

    The gate is read off the output, `g(x) = y / x` (at x = 0, where y = 0, g(0) = 1/2 for GELU, SiLU and
    QuickGELU alike): three elementwise kernels, where recomputing Phi(x) took five (`ndtr` is erf composed).
    It is the module's own gate to the last bit of `y`, whatever its approximation (erf or tanh GELU)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        gate = torch.div(y, x).nan_to_num_(nan=0.5)
        return gate.mul_(grad), None


class _ValueOnlyAttention(torch.autograd.Function):
    """Value: the attention output `o = softmax(q k^T * scale) v` as computed (fused SDPA). Backward with q and
    k detached (LibraGrad's attention rule): only `dv = A^T do`.

    A fused SDPA backward computes dq, dk and dv whether or not q and k need them (five matmuls and a softmax
    backward); with A a constant the rule needs two matmuls (A recomputed, then A^T do), done here in
    chunks of batch x heads that keep A within `_ATTN_CHUNK_BYTES`.
    Shapes: q, k `[B, H, N, d]` (detached), v `[B, N, H, d]` (a view of the qkv output), o `[B, N, H * d]`.
    """

    @staticmethod
    def forward(ctx, v, q, k, out, scale: float):
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        b, h, n, d = q.shape
        g = grad.reshape(b, n, h, d).transpose(1, 2).to(q.dtype)  # [B, H, N, d]
        dv = torch.empty_like(g)
        rows = max(1, _ATTN_CHUNK_BYTES // max(1, h * n * n * 4))
        for i in range(0, b, rows):
            scores = torch.matmul(q[i : i + rows], k[i : i + rows].transpose(-2, -1)).mul_(ctx.scale)
            attn = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(g.dtype)
            torch.matmul(attn.transpose(-2, -1), g[i : i + rows], out=dv[i : i + rows])
        return dv.transpose(1, 2), None, None, None, None


_ATTN_CHUNK_BYTES = 1 << 30
ATTENTION_BACKWARDS = ("auto", "value_only", "sdpa")


def _value_only_backward(q: Tensor) -> bool:
    """Whether fused attention under the detach_qk rule takes `_ValueOnlyAttention`'s backward or SDPA's own
    (which computes dq and dk for nothing, but in one fused kernel). Env `CAAP_LIBRAGRAD_ATTENTION_BACKWARD`:
    `value_only`, `sdpa`, or `auto` (default): value-only except for half-precision q on an accelerator, where
    the flash backward kernel is the faster of the two. The gradient is the same either way."""
    choice = os.environ.get("CAAP_LIBRAGRAD_ATTENTION_BACKWARD", "auto")
    if choice not in ATTENTION_BACKWARDS:
        raise ValueError(
            f"CAAP_LIBRAGRAD_ATTENTION_BACKWARD={choice!r} is not supported; allowed: {list(ATTENTION_BACKWARDS)}"
        )
    if choice == "auto":
        return q.device.type == "cpu" or q.dtype not in (torch.float16, torch.bfloat16)
    return choice == "value_only"


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _saved_rstd(out: Tensor) -> Tensor | None:
    """The rstd `[*, 1]` that `native_layer_norm` saved for the backward of `out`, if `out` came from it."""
    node = out.grad_fn
    rstd = getattr(node, "_saved_result2", None) if node is not None else None
    return rstd if isinstance(rstd, Tensor) and rstd.ndim == out.ndim else None


def _norm_hook(center: bool, zeros: _ZeroBuffers) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not isinstance(out, Tensor):
            return None
        shape = cast("int | tuple[int, ...]", module.normalized_shape)  # a LayerNorm / RmsNorm
        ndim = 1 if isinstance(shape, int) else len(shape)
        eps = module.eps if module.eps is not None else torch.finfo(out.dtype).eps
        weight = getattr(module, "weight", None)
        weight = weight.detach() if weight is not None else None
        rstd = _saved_rstd(out) if center and ndim == 1 else None
        return _FrozenScaleNorm.apply(args[0], out.detach(), weight, rstd, ndim, eps, center, zeros)

    return hook


def _gate_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
    if not torch.is_grad_enabled() or not isinstance(out, Tensor):
        return None
    return _DetachedGate.apply(args[0], out.detach())


def _value_only_attention_hooks(site: AttentionSite) -> list[tuple[nn.Module, str, Callable[..., Any]]]:
    """Hooks that route the backward of a fused timm `Attention` (a `qkv` site) through `_ValueOnlyAttention`.

    The qkv output and the (detached) q and k are stashed as the forward runs; a pre-hook on `attn.norm`
    (the first module after the attention product) swaps its input for the value-only rule. It applies only on
    the fused path without masks: the explicit path (fused off, e.g. when a method captures the attention
    matrix) already has q and k detached, and attention masks fall back to the same.
    """
    stash: dict[str, Any] = {}

    def call_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        masked = kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1
        stash.clear()
        stash["on"] = torch.is_grad_enabled() and module.fused_attn and not masked and not module.training

    def qkv_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if stash.get("on"):
            stash["qkv"] = out

    def qk_hook(name: str) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            if not torch.is_grad_enabled():
                return None
            out = out.detach()
            if stash.get("on"):
                stash[name] = out
            return out

        return hook

    def norm_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not stash.get("on") or "qkv" not in stash:
            return None
        q, k, qkv = stash.pop("q"), stash.pop("k"), stash.pop("qkv")
        stash.clear()
        if not qkv.requires_grad or not _value_only_backward(q):
            return None
        b, n, _ = qkv.shape
        v = qkv.reshape(b, n, 3, site.num_heads, site.head_dim)[:, :, 2]
        return (_ValueOnlyAttention.apply(v, q, k, args[0].detach(), site.scale), *args[1:])

    assert site.qkv is not None
    return [
        (site.module, "pre_kwargs", call_hook),
        (site.qkv, "fwd", qkv_hook),
        (site.q_norm, "fwd", qk_hook("q")),
        (site.k_norm, "fwd", qk_hook("k")),
        (site.out_norm, "pre", norm_pre_hook),
    ]


_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _detach_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
    return out.detach() if torch.is_grad_enabled() else None


def _scale_hook(factor: float) -> Callable[..., Tensor | None]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        return scale_grad(out, factor) if torch.is_grad_enabled() and out.requires_grad else None

    return hook


_Hook = tuple[nn.Module, str, Callable[..., Any]]


def plan_hooks(model: ViTClassifier, rules: LibraGradRules) -> list[_Hook]:
    """(module, kind, hook) in installation order, kind `fwd` (forward hook), `pre` (forward pre-hook) or
    `pre_kwargs` (pre-hook with kwargs); raises NotImplementedError on modules the rules cannot handle."""
    sites = libragrad_sites(model)
    plan: list[_Hook] = []
    zeros = _ZeroBuffers()
    # 1) norms first, so that the attention hooks on q_norm / k_norm see their substituted output
    if rules.layernorm:
        plan += [(m, "fwd", _norm_hook(centred, zeros)) for m, centred in sites.norms]
    # 2) gated-MLP products and activation gates
    if rules.gated_mlp:
        plan += [(m, "fwd", _scale_hook(0.5)) for m in sites.gated_mlp_products]
    if rules.activation:
        plan += [(act, "fwd", _gate_hook) for act in sites.gated_activations]
    # 3) attention
    for site in sites.attentions:
        if site.gate is not None and rules.activation:
            plan.append((site.gate, "fwd", _detach_hook))
        if rules.attention == "attnlrp":
            plan.append((site.q_norm, "fwd", _scale_hook(rules.qk_scale)))
            plan.append((site.k_norm, "fwd", _scale_hook(rules.qk_scale)))
            plan.append((site.out_norm, "fwd", _scale_hook(rules.out_scale)))
        elif rules.attention == "detach_qk" and site.kind == "qkv":
            plan += _value_only_attention_hooks(site)
        elif rules.attention == "detach_qk":
            # EVA02: q_norm / k_norm run before the rotary embedding, so detaching their outputs detaches the
            # rotated q and k too (A constant in backward); its qkv is an F.linear call, so SDPA's own backward
            # runs (the same gradient as the value-only one)
            plan.append((site.q_norm, "fwd", _detach_hook))
            plan.append((site.k_norm, "fwd", _detach_hook))
    return plan


@contextmanager
def libragrad(
    model: ViTClassifier, rules: bool | str | LibraGradRules | None = "full"
) -> Iterator[LibraGradRules | None]:
    """Rewire the backward pass of `model` with LibraGrad rules.

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
    plan = plan_hooks(model, resolved)
    handles = []
    _ACTIVE.add(model)
    try:
        for module, kind, hook in plan:
            if kind == "fwd":
                handles.append(module.register_forward_hook(hook))
            else:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=kind == "pre_kwargs"))
        yield resolved
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.discard(model)
