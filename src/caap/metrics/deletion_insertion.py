"""Metric wrappers: LibraGrad token deletion / insertion AUC (with mean curves) and the pointing games."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric
from caap.metrics.curves import CurveMetric
from caap.metrics.functional.pointing import grid_pointing_game, pointing_game
from caap.metrics.functional.token_perturbation import (
    Mode,
    Score,
    check_fractions,
    curve_auc,
    token_perturbation_curves,
)
from caap.models.vit import ViTClassifier


class _TokenPerturbationAUC(CurveMetric):
    """Area under a token-removal curve per (image, class), and the mean curve over de-duplicated pairs.

    The older fraction-based form (fractions 0..1 of removed / kept patches, attention-masked full-length
    batches); `caap.metrics.MIF` / `LIF` / `SRG` follow LibraGrad's ratios and scores and share their passes.
    """

    requires_model = True
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

    def _model(self, model: torch.nn.Module | None) -> ViTClassifier:
        if not isinstance(model, ViTClassifier):
            raise ValueError(f"{self.name} runs the model: pass the ViTClassifier to update(batch, model)")
        return model

    def axis(self) -> Tensor:
        return self.fractions

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

    def auc(self, curves: Tensor) -> Tensor:
        return curve_auc(curves.double(), self.fractions)


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
