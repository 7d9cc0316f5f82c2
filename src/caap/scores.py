"""The target class's score read off logits, for every method and metric.

`target_score(logits [B, C], targets [B] or [B, K], score, multilabel)` is the one definition of what a method
differentiates or patches for and what a metric records: the target's `logit`, `prob` (sigmoid for a
multi-label head, softmax otherwise), `logprob` (log-sigmoid / log-softmax) or `delta` (the logit minus a
reference logit, CAAP's patched-minus-unpatched score). `class_scores` gives every class's score (Captum's
forward functions need `[B, C]`).

Faithfulness curves record `Outcomes` (the target's logit, log-probability and top-1 hit) once per forward and
turn them into any `CurveScore` afterwards (`curve_values`, `score_curves`), so that one set of perturbed
forwards serves every score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Score = Literal["logit", "prob", "logprob", "delta"]
SCORES: tuple[Score, ...] = ("logit", "prob", "logprob", "delta")
"""Every target score; `delta` needs a reference logit."""
PROB_OR_LOGIT: tuple[Score, ...] = ("prob", "logit")
"""The scores of the perturbation methods (Captum, RISE, token sampling) and the gradient family."""

CurveScore = Literal["prob", "logit", "top1", "aopc", "log_odds"]
CURVE_SCORES: tuple[CurveScore, ...] = ("prob", "logit", "top1", "aopc", "log_odds")
"""What a faithfulness curve records per step (see `score_curves`)."""
POINT_SCORES: tuple[CurveScore, ...] = ("prob", "logit", "top1")
"""Curve scores read off one forward alone (no unperturbed reference needed)."""
DROP_SCORES: tuple[CurveScore, ...] = ("aopc", "log_odds")
"""Curve scores measured as a drop from the unperturbed value: their better direction is flipped."""


def check_score(score: str, allowed: Sequence[str] = SCORES, key: str = "score") -> Any:
    """`score` if it is one of `allowed`, else a ValueError naming `key`, the value and the choices.

    (Returned as `Any`: the checked string is a `Score` or `CurveScore`, whichever `allowed` holds.)"""
    if score not in allowed:
        raise ValueError(f"{key}={score!r} is not supported; allowed: {list(allowed)}")
    return score


def class_scores(logits: Tensor, score: Score, multilabel: bool) -> Tensor:
    """Every class's score `[B, C]` of logits `[B, C]`: `logit`, `prob` or `logprob`."""
    if score == "logit":
        return logits
    if score == "prob":
        return logits.sigmoid() if multilabel else logits.softmax(-1)
    if score == "logprob":
        return F.logsigmoid(logits) if multilabel else logits.log_softmax(-1)
    raise ValueError(f"score={score!r} has no per-class form; allowed: ['logit', 'prob', 'logprob']")


def target_score(
    logits: Tensor,
    targets: Tensor,
    score: Score,
    multilabel: bool,
    reference_logit: Tensor | None = None,
) -> Tensor:
    """The target classes' score of logits `[B, C]`: `[B]` for targets `[B]`, `[B, K]` for targets `[B, K]`.

    `prob` / `logprob`: sigmoid / log-sigmoid of the target logit for a multi-label head, else softmax /
    log-softmax over the classes. `delta`: the target logit minus `reference_logit` (the same shape as the
    result: the unpatched reference run's target logit).
    """
    idx = targets.long()
    flat = idx.ndim == 1
    if flat:
        idx = idx[:, None]
    t = logits.gather(1, idx)
    if score == "logit":
        out = t
    elif score == "delta":
        if reference_logit is None:
            raise ValueError("score='delta' needs the reference run's target logit")
        out = t - (reference_logit[:, None] if flat else reference_logit)
    elif score == "prob":
        out = t.sigmoid() if multilabel else logits.softmax(-1).gather(1, idx)
    elif score == "logprob":
        out = F.logsigmoid(t) if multilabel else logits.log_softmax(-1).gather(1, idx)
    else:
        raise ValueError(f"score={score!r} is not supported; allowed: {list(SCORES)}")
    return out[:, 0] if flat else out


class Outcomes(NamedTuple):
    """What forwards say about the target class, one entry per row (any shape, the same for all three):
    `logit`, `logprob` (log-sigmoid for multi-label heads, log-softmax otherwise) and `top1` (1.0 where the
    target is the arg-max class)."""

    logit: Tensor
    logprob: Tensor
    top1: Tensor

    def reshape(self, *shape: int) -> Outcomes:
        return Outcomes(*(t.reshape(*shape) for t in self))


def target_outcomes(logits: Tensor, targets: Tensor, multilabel: bool) -> Outcomes:
    """`Outcomes` `[B]` of logits `[B, C]` (read in float32) for target classes `[B]`."""
    logits = logits.float()
    targets = targets.long()
    top = logits.argmax(-1) == targets
    return Outcomes(
        target_score(logits, targets, "logit", multilabel),
        target_score(logits, targets, "logprob", multilabel),
        top.float(),
    )


def curve_values(outcomes: Outcomes, score: CurveScore) -> Tensor:
    """`score` in prob / logit / top1 per entry of `outcomes` (prob = exp(logprob))."""
    if score == "prob":
        return outcomes.logprob.exp()
    if score == "logit":
        return outcomes.logit
    if score == "top1":
        return outcomes.top1
    raise ValueError(f"score={score!r} needs the unperturbed outcomes; allowed here: {list(POINT_SCORES)}")


def score_curves(full: Outcomes, perturbed: Outcomes, score: CurveScore) -> Tensor:
    """Curves `[P, K + 1]` of `score` from the unperturbed `full` `[P]` and the `perturbed` `[P, K]` outcomes.

    Column 0 is the unperturbed end: the unperturbed value, or 0 for the drop scores `aopc` (p_0 - p_r,
    LibraGrad's per-ratio AOPC) and `log_odds` (log p_0 - log p_r). A row with a NaN perturbed entry (a map
    without a ranking) is NaN throughout.
    """
    check_score(score, CURVE_SCORES)
    if score == "aopc":
        p0 = full.logprob.exp()
        first, rest = torch.zeros_like(p0), p0[:, None] - perturbed.logprob.exp()
    elif score == "log_odds":
        first, rest = torch.zeros_like(full.logprob), full.logprob[:, None] - perturbed.logprob
    else:
        first, rest = curve_values(full, score), curve_values(perturbed, score)
    undefined = rest.isnan().any(1)
    first = torch.where(undefined, torch.full_like(first, float("nan")), first)
    return torch.cat([first[:, None], rest], dim=1)
