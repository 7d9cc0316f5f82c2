"""Paired comparison of two runs that scored the same (image, class) pairs: the mean difference with a paired
cluster-bootstrap CI, a Wilcoxon signed-rank p-value, Holm's correction across a table's comparisons, and the
verdict (better / worse / tied) in the metric's direction.

The Wilcoxon test (Wilcoxon 1945; `scipy.stats.wilcoxon`, zero differences dropped as Wilcoxon did) runs on
the per-image mean differences, so that the classes of one image count as one observation, as the bootstrap
resamples them together. All-zero differences (identical maps) give p = 1 and the verdict "tied". Holm
(1979) controls the family-wise error rate of all comparisons of a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

from caap.stats.bootstrap import (
    DEFAULT_SETTINGS,
    BootstrapSettings,
    bootstrap_statistics,
    cluster_sums,
    mean_terms,
    percentile_interval,
    ratio,
)

ALPHA = 0.05
"""Significance level of a verdict (on Holm-adjusted p-values)."""


@dataclass(frozen=True)
class PairedResult:
    """`a - b` over the pairs with a finite value in both runs.

    difference: mean of the per-pair differences (exactly 0 for identical values);
    low, high: its percentile CI, images resampled (`caap.stats.bootstrap`);
    p_value: Wilcoxon signed-rank p-value of the per-image mean differences (1 where all are zero);
    pairs, images: how many pairs and images were compared.
    """

    difference: float
    low: float
    high: float
    p_value: float
    pairs: int
    images: int


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of `differences [n]` (zeros dropped); 1.0 when all are zero or
    none is finite."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_difference(
    a: np.ndarray, b: np.ndarray, clusters: np.ndarray, settings: BootstrapSettings = DEFAULT_SETTINGS
) -> PairedResult:
    """Compare per-pair values `a [M]` and `b [M]` of the same pairs (images `clusters [M]`), see `PairedResult`."""
    a, b, clusters = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(clusters)
    both = np.isfinite(a) & np.isfinite(b)
    d, kept = a[both] - b[both], clusters[both]
    if d.size == 0:
        nan = float("nan")
        return PairedResult(nan, nan, nan, 1.0, 0, 0)
    per_image = ratio(cluster_sums(kept, mean_terms(d)))
    if np.all(d == 0):  # identical values: the bootstrap and the test have nothing to say
        return PairedResult(0.0, 0.0, 0.0, 1.0, int(d.size), int(per_image.size))
    low, high = percentile_interval(
        bootstrap_statistics(kept, mean_terms(d), ratio, settings), settings.level
    )
    return PairedResult(
        float(d.mean()), float(low), float(high), wilcoxon_p(per_image), int(d.size), int(per_image.size)
    )


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values `[m]` of `p_values [m]`: the k-th smallest is multiplied by
    `m - k + 1` (k from 1), made non-decreasing in that order and capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def verdict(result: PairedResult, p_adjusted: float, higher_is_better: bool, alpha: float = ALPHA) -> str:
    """'better' where a is significantly better than b (adjusted p < `alpha` and the CI of `a - b` excludes 0
    on the better side of the metric's direction), 'worse' in the mirror case, else 'tied'."""
    if not p_adjusted < alpha:
        return "tied"
    up, down = result.low > 0, result.high < 0
    if (up and higher_is_better) or (down and not higher_is_better):
        return "better"
    if (down and higher_is_better) or (up and not higher_is_better):
        return "worse"
    return "tied"
