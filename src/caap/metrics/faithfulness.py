"""LibraGrad faithfulness metrics (Mehri et al., CVPR 2025): `MIF`, `LIF` and `SRG = LIF - MIF`.

Per (image, class) the trapezoid area of the target's score while patch tokens are removed in map order, over
the removal ratios *including the unmasked end 0* (`functional.faithfulness`); the curves are kept for
`curve()`. `higher_is_better` follows the order and the score: MIF with `prob` is lower-is-better, MIF with
`aopc` higher-is-better, SRG with `prob` higher-is-better.

Shared work: instances with the same perturbation setting (`ratios`, `removal`, `baseline`, `max_batch`)
scoring the same batch share one set of perturbed forwards, which computes on the first request every order
(MIF, LIF) that a live instance with that setting needs; so MIF, LIF and SRG with any scores cost the forwards
of one MIF and one LIF curve, packed into the same batches.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.curves import CurveMetric, setting_key
from caap.metrics.functional.faithfulness import (
    ORDERS,
    REMOVALS,
    REPLACE_BASELINES,
    check_ratios,
    check_removal,
    higher_is_better,
    removal_axis,
    token_removal_outcomes,
)
from caap.references import build_token_reference
from caap.scores import CURVE_SCORES, check_score, score_curves

_LIVE: dict[int, weakref.ref] = {}
"""Live token-faithfulness metrics by id: which orders each perturbation setting needs."""


def _plain_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, DictConfig):
        return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]
    return dict(value)


class _TokenFaithfulness(CurveMetric):
    """Base of MIF / LIF / SRG; `order` names which curve (SRG = LIF - MIF)."""

    order: str = "mif"

    @property  # per instance: it depends on the score (torchmetrics forbids assigning it)
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self._better_higher

    def __init__(
        self,
        score: str = "prob",
        ratios: Sequence[float] | None = None,
        removal: str = "drop",
        baseline: str | Mapping[str, Any] = "black",
        max_batch: int = 4096,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.score_kind = check_score(score, CURVE_SCORES)
        self.ratios = check_ratios(ratios)
        if removal not in REMOVALS:
            raise ValueError(f"{self.name}: removal='{removal}' is not supported; allowed: {list(REMOVALS)}")
        self.removal = removal
        if removal == "replace":
            plain = baseline if isinstance(baseline, str) else _plain_dict(baseline)
            build_token_reference(plain, "baseline", REPLACE_BASELINES)
        self.baseline = setting_key(baseline) if not isinstance(baseline, str) else baseline
        if int(max_batch) < 1:
            raise ValueError(f"{self.name}: max_batch must be positive, got {max_batch}")
        self.max_batch = int(max_batch)
        self._better_higher = higher_is_better(self.order, score)
        key = id(self)
        _LIVE[key] = weakref.ref(self, lambda _: _LIVE.pop(key, None))

    @property
    def needs(self) -> tuple[str, ...]:
        return ORDERS if self.order == "srg" else (self.order,)

    def setting(self) -> Hashable:
        """What the perturbed forwards depend on (besides the batch and the model)."""
        baseline = self.baseline if self.removal == "replace" else None
        return (tuple(self.ratios.tolist()), self.removal, baseline, self.max_batch)

    def axis(self) -> Tensor:
        return removal_axis(self.ratios)

    def _wanted_orders(self) -> set[str]:
        """Orders needed by this instance and every live instance with the same setting."""
        mine = self.setting()
        wanted = set(self.needs)
        for ref in list(_LIVE.values()):
            other = ref()
            if isinstance(other, _TokenFaithfulness) and other.setting() == mine:
                wanted.update(other.needs)
        return wanted

    def outcomes(self, batch: AttributionBatch, model: torch.nn.Module | None) -> dict[str, Any]:
        """Perturbed `Outcomes` `[P, K]` per needed order, shared with every instance of the same setting."""
        vit = self.classifier(model)
        key = ("tokens", id(vit), self.setting())
        done = self.shared(batch, key, dict)  # order -> Outcomes, filled on demand
        if any(o not in done for o in self.needs):
            todo = sorted(o for o in self._wanted_orders() if o not in done)
            done.update(
                token_removal_outcomes(
                    vit,
                    batch.images,
                    batch.maps,
                    batch.classes,
                    self.ratios,
                    todo,
                    self.removal,
                    self.baseline,
                    self.max_batch,
                )
            )
        return {o: done[o] for o in self.needs}

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse, before any map is computed, a model this metric cannot score (e.g. `removal=drop` on a
        model whose head needs the full token grid, or an MLP-Mixer)."""
        check_removal(self.classifier(model), self.removal)

    def curves_of(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair curves `[P, K + 1]` of the score over `axis()` (SRG: LIF curve - MIF curve)."""
        check_removal(self.classifier(model), self.removal)  # before any forward pass
        full = self.unperturbed(batch, model)
        curves = {
            o: score_curves(full, out, self.score_kind) for o, out in self.outcomes(batch, model).items()
        }
        if self.order == "srg":
            return curves["lif"] - curves["mif"]
        return curves[self.order]


class MIF(_TokenFaithfulness):
    """LibraGrad MIF: area of the target's score while the most-attributed patch tokens are removed first.

    Args:
        score: 'prob' (default), 'logit', 'top1', 'aopc' or 'log_odds' (see `functional.faithfulness`).
        ratios: removal ratios in (0, 1] (default 0.1, ..., 0.9); the curve starts at the unmasked end 0.
        removal: 'drop' (tokens leave the sequence, LibraGrad) or 'replace' (by `baseline`'s tokens).
        baseline: for removal=replace: 'black', 'mean_color', 'blur' (or `{kind: blur, sigma: 5}`),
            'zero_tokens' (`caap.references`).
        max_batch: most sequences per forward pass.

    Lower is better for prob / logit / top1, higher for aopc / log_odds (`higher_is_better`).
    """

    order = "mif"


class LIF(_TokenFaithfulness):
    """LibraGrad LIF: area of the target's score while the least-attributed patch tokens are removed first.

    Same arguments as `MIF`. Higher is better for prob / logit / top1, lower for aopc / log_odds.
    """

    order = "lif"


class SRG(_TokenFaithfulness):
    """LibraGrad SRG = LIF - MIF: the area between the two curves (per pair, then averaged).

    Same arguments as `MIF`. Higher is better for prob / logit / top1, lower for aopc / log_odds.
    """

    order = "srg"
