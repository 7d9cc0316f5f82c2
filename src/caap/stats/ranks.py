"""Mean rank of each method over a metric set, with a joint cluster-bootstrap CI (the overview tables of
attribution papers rank every method per metric and average the ranks; e.g. LibraGrad, Tab. 1).

Rank 1 is the best value of a metric in its direction; ties share the average rank (`scipy.stats.rankdata`),
an undefined (NaN) mean ranks last. The CI resamples images jointly for every run and metric (all runs scored
the same pairs), recomputes every mean, the ranks and their average per resample, and takes percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from caap.stats.bootstrap import (
    DEFAULT_SETTINGS,
    BootstrapSettings,
    bootstrap_statistics,
    mean_terms,
    percentile_interval,
    ratio,
)


@dataclass(frozen=True)
class MeanRanks:
    """mean: mean rank `[K]` of each run over the metrics (1 = best); low, high: its percentile CI `[K]`;
    per_metric: the ranks `[K, N]` of the full-sample means."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    per_metric: np.ndarray


def metric_ranks(means: np.ndarray, higher_is_better: np.ndarray) -> np.ndarray:
    """Ranks `[..., K, N]` of `means [..., K, N]` over the K runs of each metric (1 = best; ties averaged;
    NaN last)."""
    signed = np.where(np.asarray(higher_is_better, bool), -means, means)  # smaller is better
    signed = np.where(np.isnan(signed), np.inf, signed)
    return rankdata(signed, axis=-2, method="average")


def mean_ranks(
    values: np.ndarray,
    clusters: np.ndarray,
    higher_is_better: np.ndarray,
    settings: BootstrapSettings = DEFAULT_SETTINGS,
) -> MeanRanks:
    """Mean ranks of K runs over N metrics from per-pair `values [K, N, M]` of the same M pairs (images
    `clusters [M]`) and each metric's direction `higher_is_better [N]`; see `MeanRanks`."""
    values = np.asarray(values, dtype=np.float64)
    k, n, m = values.shape
    terms = mean_terms(values.reshape(k * n, m).T).reshape(m, -1)  # [M, K*N*2]

    def ranks_of(sums: np.ndarray) -> np.ndarray:
        means = ratio(sums.reshape(*sums.shape[:-1], k, n, 2))
        return metric_ranks(means, higher_is_better).mean(-1)  # [..., K]

    per_metric = metric_ranks(ratio(terms.sum(0).reshape(k, n, 2)), higher_is_better)
    low, high = percentile_interval(bootstrap_statistics(clusters, terms, ranks_of, settings), settings.level)
    return MeanRanks(per_metric.mean(-1), low, high, per_metric)
