"""`CurveMetric`: per-(image, class) curves over a fixed x axis, scored by their trapezoid area, DDP-exact.

Subclasses give the axis (`axis() -> [S]`) and the curves of a batch (`curves_of(batch, model) -> [P, S]`);
the area of each curve is the per-pair value (`AttributionMetric`), and the curves are kept in a "cat" state
so that `curve()` (the mean curve) and `per_sample_curves()` see the de-duplicated pairs of every rank.
Maps that are constant (all-zero included) still give a defined curve (ties are ranked by position), with a
logged warning; maps with a non-finite entry give a NaN curve, skipped and counted by `compute`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics._cache import BATCH_CACHE
from caap.metrics.base import AttributionMetric, _cat, _nonempty

log = logging.getLogger(__name__)


def warn_degenerate_maps(name: str, maps: Tensor) -> None:
    """Log how many maps `[P, ...]` are constant (ranked by position) or non-finite (undefined)."""
    flat = maps.detach().reshape(maps.shape[0], -1)
    if flat.numel() == 0:
        return
    finite = torch.isfinite(flat).all(1)
    constant = finite & (flat.amax(1) == flat.amin(1))
    if constant.any():
        log.warning(
            "%s: %d of %d maps are constant (e.g. all zero); their order is by position, not by attribution",
            name,
            int(constant.sum()),
            flat.shape[0],
        )
    if (~finite).any():
        log.warning(
            "%s: %d of %d maps have NaN / inf entries; their curves are undefined",
            name,
            int((~finite).sum()),
            flat.shape[0],
        )


class CurveMetric(AttributionMetric):
    """Area under a per-pair curve; also the mean curve (`curve`) and the per-pair curves."""

    requires_model = True

    def __init__(self, name: str | None = None, **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.add_state("curves", default=[], dist_reduce_fx="cat")

    def axis(self) -> Tensor:
        """The curve's x axis `[S]` float64, strictly increasing."""
        raise NotImplementedError

    def curves_of(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair curves `[P, S]` for this batch."""
        raise NotImplementedError

    def auc(self, curves: Tensor) -> Tensor:
        """Trapezoid areas `[P]` of curves `[P, S]` over `axis()`; NaN curves give NaN."""
        x = self.axis().to(device=curves.device, dtype=torch.float64)
        if x.numel() == 1:
            return curves[:, 0].double() * 0.0
        return torch.trapezoid(curves.double(), x=x, dim=-1)

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        return self.auc(self.curves_of(batch, model))

    def update(self, batch: AttributionBatch, model: torch.nn.Module | None = None) -> Tensor:  # type: ignore[override]
        """Store the per-pair area `[P]` (returned) and curves `[P, S]` of this batch."""
        memo = BATCH_CACHE.entry(batch)
        if "maps-checked" not in memo:  # one warning per batch, not one per curve metric
            memo["maps-checked"] = True
            warn_degenerate_maps(self.name, batch.maps)
        curves = self.curves_of(batch, model).detach().double()
        values = self._append(self.auc(curves), batch)
        self.curves.append(curves.to(values.device))
        return values

    def per_sample_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        """De-duplicated `(index [M], class [M], curves [M, S])` of all ranks, sorted by (index, class); a
        collective call under DDP, like `compute`."""
        s = self.axis().numel()
        with self._gathered():
            if not _nonempty(self.curves):
                empty = torch.zeros(0)
                return empty.long(), empty.long(), torch.zeros(0, s, dtype=torch.float64)
            index, cls, order = self._dedup_order()
            return index, cls, _cat(self.curves).reshape(-1, s)[order]

    def curve(self) -> tuple[Tensor, Tensor]:
        """`(axis [S], mean curve [S])` over de-duplicated pairs of all ranks whose curve is finite (NaN if none)."""
        _, _, curves = self.per_sample_curves()
        x = self.axis().clone()
        finite = torch.isfinite(curves).all(1)
        if not finite.any():
            return x, torch.full((x.numel(),), float("nan"), dtype=torch.float64)
        return x, curves[finite].mean(0).cpu()
