"""`CurveMetric`, the base of every curve metric, and `BatchMemo`, the work that curve metrics share in a batch.

A curve metric gives its x axis (`axis() -> [S]`) and the curves of a batch (`curves_of(batch, model) ->
[P, S]`); the base stores the trapezoid area of each curve as the per-pair value (`AttributionMetric`, exact
under DDP) and the curves in a "cat" state for `curve()` (the mean curve) and `per_sample_curves()`.

Shared work: the Lightning module updates every metric with the same `AttributionBatch` object, so results
keyed by that object can be reused by every metric scoring it. `self.shared(batch, key, compute)` runs
`compute()` once per (batch object, key) for all metrics of the process (`SHARED`; entries are dropped when
the batch is garbage-collected), and `self.unperturbed(batch, model)` is the batch's plain forward, computed
once for every curve metric. A new curve metric needs only its own module: subclass `CurveMetric`, implement
`axis` and `curves_of`, and key any expensive work on what it depends on (the model's `id`, the settings).
The model is assumed unchanged while one batch is being scored.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric
from caap.metrics.functional.faithfulness import unperturbed_outcomes
from caap.models.vit import ViTClassifier
from caap.scores import Outcomes
from caap.stats import DEFAULT_SETTINGS, BootstrapSettings
from caap.stats import curve_band as bootstrap_curve_band

log = logging.getLogger(__name__)


class BatchMemo:
    """Results computed for a batch object, kept exactly as long as the batch lives.

    `get(batch, key, compute)` runs `compute()` once per (batch object, key); `entry(batch)` is the batch's
    memo dict itself (for work that fills several keys at once). A `weakref.finalize` drops the entry with the
    batch, so nothing is recomputed within a batch and nothing leaks across batches.
    """

    def __init__(self) -> None:
        self._store: dict[int, dict[Hashable, Any]] = {}

    def entry(self, batch: object) -> dict[Hashable, Any]:
        """The memo dict of `batch` (created on first use, dropped when the batch is garbage-collected)."""
        bid = id(batch)
        memo = self._store.get(bid)
        if memo is None:
            memo = self._store[bid] = {}
            weakref.finalize(batch, self._store.pop, bid, None)
        return memo

    def get(self, batch: object, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()`'s result for (`batch`, `key`), computed on the first request only."""
        memo = self.entry(batch)
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def clear(self) -> None:
        self._store.clear()


SHARED = BatchMemo()
"""The process-wide memo every curve metric shares."""


def setting_key(value: Any) -> Hashable:
    """A hashable form of a metric setting (a Hydra `DictConfig`, mapping or list: sorted, nested tuples), to
    key shared work by."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), setting_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(setting_key(v) for v in value)
    return value


CONSTANT_TOKEN_ORDER = "their patches are ranked by position, not by attribution"


def warn_degenerate_maps(name: str, maps: Tensor, constant_order: str = CONSTANT_TOKEN_ORDER) -> None:
    """Log how many maps `[P, ...]` are constant (`constant_order` says how they are ranked) or non-finite."""
    flat = maps.detach().reshape(maps.shape[0], -1)
    if flat.numel() == 0:
        return
    finite = torch.isfinite(flat).all(1)
    constant = finite & (flat.amax(1) == flat.amin(1))
    if constant.any():
        log.warning(
            "%s: %d of %d maps are constant (e.g. all zero); %s",
            name,
            int(constant.sum()),
            flat.shape[0],
            constant_order,
        )
    if (~finite).any():
        log.warning(
            "%s: %d of %d maps have NaN / inf entries; their curves are undefined",
            name,
            int((~finite).sum()),
            flat.shape[0],
        )


class CurveMetric(AttributionMetric):
    """Area under a per-pair curve `[P, S]` over `axis()`; also the mean curve (`curve`) and the per-pair curves.

    Maps that are constant (all-zero included) still give a defined curve (ranked as `constant_order` says), with
    a logged warning; maps with a non-finite entry give a NaN curve, skipped and counted by `compute`.
    """

    requires_model = True
    constant_order: str = CONSTANT_TOKEN_ORDER
    """How a constant map is ranked, for the warning (true for this metric's ranking)."""
    curves: list[Tensor]

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.add_state("curves", default=[], dist_reduce_fx="cat")

    def axis(self) -> Tensor:
        """The curve's x axis `[S]` float64, strictly increasing."""
        raise NotImplementedError

    def curves_of(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair curves `[P, S]` for this batch."""
        raise NotImplementedError

    # -- shared work -----------------------------------------------------------------------------------------
    def classifier(self, model: torch.nn.Module | None) -> ViTClassifier:
        """`model` as the `ViTClassifier` this metric runs, or a clear error when none was passed."""
        if not isinstance(model, ViTClassifier) and not hasattr(model, "embed"):
            raise ValueError(f"{self.name} runs the model: pass the ViTClassifier to update(batch, model)")
        return model  # type: ignore[return-value]

    def shared(self, batch: AttributionBatch, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` once per (batch, `key`) for every metric of the process (`SHARED`)."""
        return SHARED.get(batch, key, compute)

    def unperturbed(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Outcomes:
        """The batch's unperturbed `Outcomes` `[P]` (the plain forward), computed once for every curve metric."""
        vit = self.classifier(model)
        return SHARED.get(
            batch,
            ("unperturbed", id(vit)),
            lambda: unperturbed_outcomes(vit, batch.images, batch.classes),
        )

    # -- values and curves -----------------------------------------------------------------------------------
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
        memo = SHARED.entry(batch)
        checked = ("maps-checked", self.constant_order)
        if checked not in memo:  # one warning per batch and kind of order, not one per curve metric
            memo[checked] = True
            warn_degenerate_maps(self.name, batch.maps, self.constant_order)
        curves = self.curves_of(batch, model).detach().double()
        values = self._append(self.auc(curves), batch)
        self.curves.append(curves.to(values.device))
        return values

    def per_sample_curves(self) -> tuple[Tensor, Tensor, Tensor]:
        """De-duplicated `(index [M], class [M], curves [M, S])` of all ranks, sorted by (index, class); a
        collective call under DDP, like `compute`."""
        s = self.axis().numel()
        with self._gathered():
            stored = self.curves
            if (len(stored) if isinstance(stored, list) else stored.numel()) == 0:
                empty = torch.zeros(0)
                return empty.long(), empty.long(), torch.zeros(0, s, dtype=torch.float64)
            index, cls, order = self._dedup_order()
            return index, cls, dim_zero_cat(stored).reshape(-1, s)[order]

    def curve(self) -> tuple[Tensor, Tensor]:
        """`(axis [S], mean curve [S])` over de-duplicated pairs of all ranks whose curve is finite (NaN if none)."""
        _, _, curves = self.per_sample_curves()
        x = self.axis().clone()
        finite = torch.isfinite(curves).all(1)
        if not finite.any():
            return x, torch.full((x.numel(),), float("nan"), dtype=torch.float64)
        return x, curves[finite].mean(0).cpu()

    def curve_band(self, settings: BootstrapSettings = DEFAULT_SETTINGS) -> tuple[Tensor, Tensor]:
        """Pointwise percentile band `(low [S], high [S])` of `curve()`'s mean curve: images resampled with
        replacement, the same draws for every point (`caap.stats.curve_band`); NaN without a finite curve."""
        index, _, curves = self.per_sample_curves()
        low, high = bootstrap_curve_band(curves.cpu().numpy(), index.cpu().numpy(), settings)
        return torch.from_numpy(low), torch.from_numpy(high)
