"""Statistics of runs and comparisons (numpy / scipy only, no torch): cluster-bootstrap confidence intervals of
metric values and mean curves (`bootstrap`), paired comparisons with Wilcoxon and Holm (`paired`), and the
mean-rank summary over a metric set (`ranks`). See docs/statistics.md."""

from caap.stats.bootstrap import (
    DEFAULT_SETTINGS,
    BootstrapSettings,
    bootstrap_statistics,
    curve_band,
    format_value,
    mean_interval,
    percentile_interval,
)
from caap.stats.paired import ALPHA, PairedResult, holm, paired_difference, verdict, wilcoxon_p
from caap.stats.ranks import MeanRanks, mean_ranks

__all__ = [
    "ALPHA",
    "DEFAULT_SETTINGS",
    "BootstrapSettings",
    "MeanRanks",
    "PairedResult",
    "bootstrap_statistics",
    "curve_band",
    "format_value",
    "holm",
    "mean_interval",
    "mean_ranks",
    "paired_difference",
    "percentile_interval",
    "verdict",
    "wilcoxon_p",
]
