"""The pointing games on ground-truth masks: `PointingGame` (Zhang et al., ECCV 2016) and `GridPointingGame`
(GridPG, Rao et al., CVPR 2022). No forward pass: the maps `[P, gh, gw]` and the target's masks only."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric
from caap.metrics.functional.pointing import grid_pointing_game, pointing_game


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
