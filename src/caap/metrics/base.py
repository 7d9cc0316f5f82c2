"""`AttributionMetric`: a torchmetrics Metric over per-(image, class) values, exact under DDP.

Each update appends one value per (image, target class) pair together with its dataset index and class.
`compute` concatenates the states of all ranks (torchmetrics' "cat" reduction), drops duplicates by
(index, class) (Lightning's DistributedSampler pads the last batch by repeating samples), and averages the
finite values, so one process and several give the same number. NaN values (undefined cases such as an
all-zero map) are skipped in the mean and counted in `<name>/undefined`, with a logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from caap.batch import AttributionBatch
from caap.stats import DEFAULT_SETTINGS, BootstrapSettings, bootstrap_statistics, percentile_interval

log = logging.getLogger(__name__)


class AttributionMetric(Metric):
    """Base class: subclasses implement `score(batch, model) -> [P]` (or a dict of named `[P]` values).

    `higher_is_better` tells reports which way is better; `requires_model` marks metrics that run the model;
    `requires_masks` those that need the dataset's ground-truth masks (checked before any map is computed);
    `requires_method` those that re-run the attribution method (`AttributionModule` sets their `method`
    when it is None). Optional capabilities with "nothing" defaults: `check_model`, `extra_results`,
    `extra_per_sample`, `curve`, `curve_band`. Uncertainty: `confidence_interval` resamples images
    (`caap.stats`) over `bootstrap_terms` and `statistic`, the mean of the finite values unless a subclass
    estimates its value otherwise (e.g. a ratio of summed counts).
    """

    full_state_update = False
    higher_is_better: bool = True
    requires_model: bool = False
    requires_masks: bool = False
    requires_method: bool = False
    #: the attribution method a `requires_method` metric re-runs (an `AttributionMethod`; metrics do not
    #: import methods, so it is typed loosely)
    method: Any = None
    # "cat" states: lists of per-update tensors, one tensor each after a DDP sync
    values: list[Tensor]
    sample_index: list[Tensor]
    sample_class: list[Tensor]

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name or type(self).__name__
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("sample_index", default=[], dist_reduce_fx="cat")
        self.add_state("sample_class", default=[], dist_reduce_fx="cat")

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Per-pair values `[P]` for this batch."""
        raise NotImplementedError

    def update(self, batch: AttributionBatch, model: torch.nn.Module | None = None) -> Tensor:  # type: ignore[override]
        return self._append(self.score(batch, model), batch)

    # -- optional capabilities --------------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise a ValueError, before any map is computed, when the metric is undefined on `model` (e.g. token
        removal on a model that cannot lose tokens). Default: every model is fine."""

    def extra_results(self) -> dict[str, float]:
        """Further named results besides `compute()`, reported as `<name>/<key>` (e.g. per sanity stage); a
        collective call under DDP, made inside `sync_context`. Default: none."""
        return {}

    def extra_per_sample(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Further per-pair values `{key: (index [M], class [M], value [M])}` besides `per_sample()`, written
        as `<name>/<key>` columns of per_image.csv; made inside `sync_context`. Default: none."""
        return {}

    def curve(self) -> tuple[Tensor, Tensor] | None:
        """`(x [S], mean curve [S])` of a curve metric over the de-duplicated pairs of all ranks (a collective
        call under DDP: every rank makes it), or None (default) for a metric without a curve."""
        return None

    def curve_band(self, settings: BootstrapSettings = DEFAULT_SETTINGS) -> tuple[Tensor, Tensor] | None:
        """Pointwise bootstrap band `(low [S], high [S])` of the mean curve (a collective call under DDP, as
        `curve`), or None (default) for a metric without a curve."""
        return None

    # -- uncertainty -----------------------------------------------------------------------------------------
    def bootstrap_terms(self) -> tuple[Tensor, Tensor]:
        """`(index [M], terms [M, T])` of the de-duplicated pairs such that the metric's value is
        `statistic(terms.sum(0))`. Default: `(value, 1)` of finite values, `(0, 0)` of NaN ones (the mean over
        the finite values, as `compute`). Made where `per_sample` is (inside `sync_context` under DDP)."""
        index, _, values = self.per_sample()
        finite = torch.isfinite(values)
        terms = torch.stack([torch.where(finite, values, torch.zeros_like(values)), finite.double()], -1)
        return index, terms

    def statistic(self, sums: Tensor) -> Tensor:
        """The metric's value `[...]` from summed `bootstrap_terms` `[..., T]` (default: sum / count, NaN for
        no count)."""
        count = sums[..., 1]
        return torch.where(count > 0, sums[..., 0] / count.clamp_min(1), torch.full_like(count, float("nan")))

    def confidence_interval(self, settings: BootstrapSettings = DEFAULT_SETTINGS) -> tuple[float, float]:
        """Percentile bootstrap CI `(low, high)` of the metric's value: images (dataset indices) resampled with
        replacement, all their pairs taken (`caap.stats.bootstrap`); NaN bounds without values. Made where
        `per_sample` is (inside `sync_context` under DDP)."""
        index, terms = self.bootstrap_terms()
        if index.numel() == 0:
            return float("nan"), float("nan")

        def value_of(sums: np.ndarray) -> np.ndarray:
            return self.statistic(torch.from_numpy(sums)).numpy()

        samples = bootstrap_statistics(index.cpu().numpy(), terms.cpu().double().numpy(), value_of, settings)
        low, high = percentile_interval(samples, settings.level)
        return float(low), float(high)

    def _append(self, values: Tensor, batch: AttributionBatch) -> Tensor:
        """Store per-pair `values` `[P]` with the batch's (index, class) keys; returns them as float64."""
        values = values.detach().to(torch.float64).reshape(-1)
        if values.numel() != len(batch):
            raise ValueError(f"{self.name}.score returned {values.numel()} values for {len(batch)} maps")
        self.values.append(values)
        self.sample_index.append(batch.index.detach().long().reshape(-1).to(values.device))
        self.sample_class.append(batch.classes.detach().long().reshape(-1).to(values.device))
        return values

    def _dedup_order(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(index [M], class [M], order [M])`: positions in the concatenated states of the first occurrence of
        each (index, class), sorted by (index, class). Extra per-pair "cat" states of subclasses, appended in
        step with `values`, are de-duplicated by indexing their concatenation with `order`."""
        # .long(): a rank that saw no data contributes an empty float tensor to torchmetrics' gather
        index, cls = _cat(self.sample_index).long(), _cat(self.sample_class).long()
        key = index * (int(cls.max()) + 1 if cls.numel() else 1) + cls
        key_sorted, order = torch.sort(key, stable=True)
        keep = torch.ones_like(key_sorted, dtype=torch.bool)
        keep[1:] = key_sorted[1:] != key_sorted[:-1]
        order = order[keep]
        return index[order], cls[order], order

    @contextmanager
    def _gathered(self) -> Iterator[None]:
        """Within the block the states are those of all ranks, as inside `compute` (a collective call under
        DDP: every rank must enter it); nothing happens when they already are or when not distributed."""
        if self._is_synced:
            yield
            return
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            yield

    def per_sample(self) -> tuple[Tensor, Tensor, Tensor]:
        """De-duplicated `(index [M], class [M], value [M])`, sorted by (index, class)."""
        if not _nonempty(self.values):
            empty = torch.zeros(0)
            return empty.long(), empty.long(), empty.double()
        index, cls, order = self._dedup_order()
        return index, cls, _cat(self.values)[order]

    def undefined_reasons(self) -> list[str]:
        """Why values of this process were undefined (NaN), for `compute`'s one warning; default: none given."""
        return []

    def compute(self) -> Tensor:
        _, _, values = self.per_sample()
        finite = torch.isfinite(values)
        undefined = int((~finite).sum())
        if undefined:
            reasons = self.undefined_reasons()
            log.warning(
                "%s: %d of %d values undefined (skipped in the mean)%s",
                self.name,
                undefined,
                values.numel(),
                f": {'; '.join(reasons)}" if reasons else "",
            )
        if not finite.any():
            return torch.tensor(float("nan"), dtype=torch.float64)
        return values[finite].mean()


def _cat(x: list[Tensor] | Tensor) -> Tensor:
    return torch.cat(x) if isinstance(x, list) else x


def _nonempty(x: list[Tensor] | Tensor) -> bool:
    return (len(x) > 0) if isinstance(x, list) else x.numel() > 0


def higher_is_better(name: str, metrics: dict[str, AttributionMetric]) -> bool:
    """Direction of the result `name`: the metric's own, or for a sub-result `<metric>/<key>` (e.g. a sanity
    stage `sanity/block3`) the direction of `<metric>`; True for names that match no metric."""
    metric = metrics.get(name) or metrics.get(name.split("/", 1)[0])
    return True if metric is None else bool(metric.higher_is_better)
