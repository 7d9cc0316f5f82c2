"""Metric wrappers: LibraGrad token deletion / insertion AUC (with mean curves) and the pointing games."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric, _cat, _nonempty
from caap.metrics.functional.pointing import grid_pointing_game, pointing_game
from caap.metrics.functional.token_perturbation import (
    Mode,
    Score,
    check_fractions,
    curve_auc,
    token_perturbation_curves,
)
from caap.models.vit import ViTClassifier


class _TokenPerturbationAUC(AttributionMetric):
    """Area under a token-removal curve per (image, class), and the mean curve over de-duplicated pairs."""

    requires_model = True
    removes_tokens = True  # hides tokens by attention masks: undefined on MLP-Mixer
    mode: Mode = "deletion"

    def __init__(
        self,
        fractions: Sequence[float] | None = None,
        score: Score = "prob",
        max_batch: int = 4096,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if score not in ("prob", "logit"):
            raise ValueError(f"{self.name}: score must be 'prob' or 'logit', got '{score}'")
        self.fractions = check_fractions(fractions)
        self.score_kind: Score = score
        self.max_batch = int(max_batch)
        self.add_state("curves", default=[], dist_reduce_fx="cat")

    def _model(self, model: torch.nn.Module | None) -> ViTClassifier:
        if not isinstance(model, ViTClassifier):
            raise ValueError(f"{self.name} runs the model: pass the ViTClassifier to update(batch, model)")
        return model

    def curves_of(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair curves `[P, K]` for this batch (LibraGrad token removal, see `token_perturbation_curves`)."""
        return token_perturbation_curves(
            self._model(model),
            batch.images,
            batch.maps,
            batch.classes,
            self.fractions,
            self.mode,
            self.score_kind,
            self.max_batch,
        )

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair AUC `[P]` by the trapezoid rule over the fractions."""
        return curve_auc(self.curves_of(batch, model).double(), self.fractions)

    def update(self, batch: AttributionBatch, model: torch.nn.Module | None = None) -> Tensor:  # type: ignore[override]
        """Store the per-pair AUC `[P]` (returned) and curves `[P, K]` of this batch; the curves run once."""
        curves = self.curves_of(batch, model).detach().double()
        values = self._append(curve_auc(curves, self.fractions), batch)
        self.curves.append(curves.to(values.device))
        return values

    def per_sample_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        """De-duplicated `(index [M], class [M], curves [M, K])` of all ranks, sorted by (index, class).

        Gathers across ranks like `compute` (under DDP every rank must call it)."""
        with self._gathered():
            if not _nonempty(self.curves):
                empty = torch.zeros(0)
                return empty.long(), empty.long(), torch.zeros(0, self.fractions.numel(), dtype=torch.float64)
            index, cls, order = self._dedup_order()
            return index, cls, _cat(self.curves).reshape(-1, self.fractions.numel())[order]

    def curve(self) -> tuple[Tensor, Tensor]:
        """`(fractions [K], mean curve [K])` over de-duplicated pairs of all ranks whose curve is finite (NaN if
        none); a collective call under DDP, like `compute`."""
        _, _, curves = self.per_sample_curves()
        finite = torch.isfinite(curves).all(1)
        if not finite.any():
            return self.fractions.clone(), torch.full(
                (self.fractions.numel(),), float("nan"), dtype=torch.float64
            )
        return self.fractions.clone(), curves[finite].mean(0).cpu()


class TokenDeletionAUC(_TokenPerturbationAUC):
    """LibraGrad MIF: AUC of the target score while the most-attributed patch tokens are removed first.

    Args:
        fractions: removed fractions, strictly increasing in [0, 1] (default 0.0, 0.1, ..., 1.0).
        score: 'prob' (softmax, or sigmoid for multi-label heads) or 'logit'.
        max_batch: sequences per forward pass. Lower is better.
    """

    higher_is_better = False
    mode: Mode = "deletion"


class TokenInsertionAUC(_TokenPerturbationAUC):
    """LibraGrad LIF: AUC of the target score when only the most-attributed fraction of patch tokens is kept.

    Args:
        fractions: kept fractions, strictly increasing in [0, 1] (default 0.0, 0.1, ..., 1.0).
        score: 'prob' (softmax, or sigmoid for multi-label heads) or 'logit'.
        max_batch: sequences per forward pass. Higher is better.
    """

    higher_is_better = True
    mode: Mode = "insertion"


def _target_masks(metric: AttributionMetric, batch: AttributionBatch, kind: str) -> Tensor:
    masks = batch.target_masks(kind)
    if masks is None:
        raise ValueError(
            f"{metric.name} needs per-class {kind} masks, but the dataset has no masks (batch.{kind}_masks is None);"
            f" use a dataset with ground-truth masks (e.g. FashionGrid) or drop this metric"
        )
    return masks


class GridPointingGame(AttributionMetric):
    """GridPG (Rao et al., CVPR 2022): positive attribution in the target's grid cell / total positive attribution.

    Needs `batch.cell_masks`; an all-nonpositive map is undefined (NaN: skipped and counted by `compute`).
    """

    higher_is_better = True
    requires_model = False
    requires_masks = True

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair GridPG `[P]` from maps `[P, gh, gw]` and the target cell masks `[P, H, W]`."""
        return grid_pointing_game(batch.maps, _target_masks(self, batch, "cell").to(batch.maps.device))


class PointingGame(AttributionMetric):
    """Pointing game (Zhang et al., ECCV 2016): hit rate of the map's arg-max patch on the target's mask.

    Args:
        mask: 'item' (the object's pixels, default) or 'cell' (its grid cell).
    """

    higher_is_better = True
    requires_model = False
    requires_masks = True

    def __init__(self, mask: str = "item", name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if mask not in ("item", "cell"):
            raise ValueError(f"{self.name}: mask must be 'item' or 'cell', got '{mask}'")
        self.mask = mask

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair hits `[P]` (1.0 / 0.0) from maps `[P, gh, gw]` and the target masks `[P, H, W]`."""
        return pointing_game(batch.maps, _target_masks(self, batch, self.mask).to(batch.maps.device))
