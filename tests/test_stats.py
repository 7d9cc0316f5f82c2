"""`caap.stats`: the cluster bootstrap against a plain loop, image clustering, curve bands, the paired test,
Holm against a hand-computed example, mean ranks, and the metrics' own intervals (ratio-of-counts metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caap.stats import (
    BootstrapSettings,
    curve_band,
    holm,
    mean_interval,
    mean_ranks,
    paired_difference,
    verdict,
    wilcoxon_p,
)
from caap.stats import bootstrap as bootstrap_module

SETTINGS = BootstrapSettings(resamples=1000, seed=7, level=0.95)


def loop_interval(
    values: np.ndarray, clusters: np.ndarray, settings: BootstrapSettings
) -> tuple[float, float]:
    """The textbook cluster bootstrap, one resample at a time: draw images with replacement, take all their
    pairs, average the finite values; percentile interval."""
    images = np.unique(clusters)
    rng = np.random.default_rng(settings.seed)
    means = []
    for _ in range(settings.resamples):
        drawn = images[rng.integers(0, len(images), size=len(images))]
        pairs = np.concatenate([values[clusters == i] for i in drawn])
        means.append(np.nanmean(pairs) if np.isfinite(pairs).any() else np.nan)
    tail = (1 - settings.level) / 2
    low, high = np.nanquantile(np.array(means), [tail, 1 - tail])
    return float(low), float(high)


def grid_values(images: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair values of 1 to 4 classes per image (an image effect shared by its classes), some NaN."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, size=images)
    clusters = np.repeat(np.arange(images) * 3 + 5, counts)  # dataset indices, not 0..n-1
    values = rng.normal(0.5, 0.2, images)[np.searchsorted(np.arange(images) * 3 + 5, clusters)]
    values = values + rng.normal(0, 0.05, clusters.size)
    values[[3, 17]] = np.nan
    return values, clusters


def test_vectorised_bootstrap_equals_a_plain_loop_and_covers_the_mean(monkeypatch) -> None:
    values, clusters = grid_values()
    reference = loop_interval(values, clusters, SETTINGS)
    assert mean_interval(values, clusters, SETTINGS) == pytest.approx(reference, rel=1e-12)
    monkeypatch.setattr(bootstrap_module, "CHUNK_ELEMENTS", 7 * 40)  # blocks of 7 resamples: same draws
    low, high = mean_interval(values, clusters, SETTINGS)
    assert (low, high) == pytest.approx(reference, rel=1e-12)
    assert low < np.nanmean(values) < high
    assert mean_interval(values, clusters, BootstrapSettings(seed=8)) != (low, high)  # the seed matters


def test_duplicating_the_pairs_of_images_does_not_shrink_the_interval() -> None:
    """Each image's pairs drawn together: repeating every pair of an image 5 times leaves its weight and the
    interval as they are (resampling pairs would narrow it by about sqrt(5))."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=60)
    clusters = np.arange(60)
    width = np.subtract(*mean_interval(values, clusters, SETTINGS)[::-1])
    repeated = np.repeat(values, 5), np.repeat(clusters, 5)
    assert np.subtract(*mean_interval(*repeated, SETTINGS)[::-1]) == pytest.approx(width, rel=1e-9)
    as_pairs = np.subtract(*mean_interval(repeated[0], np.arange(300), SETTINGS)[::-1])
    assert as_pairs < 0.6 * width  # what a pair bootstrap would have claimed


def test_curve_band_is_the_interval_of_each_point() -> None:
    values, clusters = grid_values(30, seed=1)
    curves = np.stack([values, 2 * values + 1, values**2], 1)
    curves[np.isnan(values)] = np.nan
    low, high = curve_band(curves, clusters, SETTINGS)
    keep = np.isfinite(values)
    for j in range(3):
        assert (low[j], high[j]) == pytest.approx(mean_interval(curves[keep, j], clusters[keep], SETTINGS))
    mean = curves[keep].mean(0)
    assert np.all(low < mean) and np.all(mean < high)


def test_identical_runs_differ_by_exactly_zero_and_tie() -> None:
    values, clusters = grid_values()
    result = paired_difference(values, values.copy(), clusters, SETTINGS)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert verdict(result, holm(np.array([result.p_value]))[0], higher_is_better=True) == "tied"
    assert wilcoxon_p(np.zeros(9)) == 1.0


def test_a_shifted_run_is_significantly_better_in_the_metrics_direction() -> None:
    values, clusters = grid_values()
    noise = np.random.default_rng(5).normal(0, 0.01, values.size)
    better = values + 0.05 + noise
    result = paired_difference(better, values, clusters, SETTINGS)
    finite = np.isfinite(values)
    assert result.difference == pytest.approx(np.mean(better[finite] - values[finite]))
    assert result.low > 0 and result.p_value < 1e-6 and result.images == len(np.unique(clusters[finite]))
    # the signed-rank test counts each image once: it runs on the per-image mean differences
    per_image = [np.mean((better - values)[finite & (clusters == i)]) for i in np.unique(clusters[finite])]
    assert result.p_value == pytest.approx(wilcoxon_p(np.array(per_image)), rel=1e-12)
    assert result.p_value != pytest.approx(wilcoxon_p((better - values)[finite]), rel=1e-3)
    assert verdict(result, result.p_value, higher_is_better=True) == "better"
    assert verdict(result, result.p_value, higher_is_better=False) == "worse"  # e.g. deletion: lower wins
    assert verdict(result, 0.2, higher_is_better=True) == "tied"  # not significant after correction


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone: 0.06
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.9])
    # with 5 tests: 0.005*5 = 0.025, 0.01*4 = 0.04, 0.03*3 = 0.09, 0.04*2 = 0.08 -> 0.09, 0.9*1 -> 0.9
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.9])
    assert holm(np.array([0.5, 0.6])) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm(np.array([])).size == 0


def test_mean_ranks_and_their_interval() -> None:
    values, clusters = grid_values(60, seed=2)
    values = np.nan_to_num(values, nan=0.5)
    noise = np.random.default_rng(1).normal(0, 1e-3, (3, values.size))
    # run 0 best on both metrics, run 1 second; metric 1 is lower-is-better (its values are negated)
    runs = np.stack([values + 0.2 + noise[0], values + 0.1 + noise[1], values + noise[2]])
    per_pair = np.stack([runs, -runs], 1)  # [K=3, N=2, M]
    ranks = mean_ranks(per_pair, clusters, np.array([True, False]), SETTINGS)
    assert ranks.mean.tolist() == [1.0, 2.0, 3.0]
    assert ranks.per_metric.tolist() == [[1, 1], [2, 2], [3, 3]]
    assert ranks.low.tolist() == [1.0, 2.0, 3.0] and ranks.high.tolist() == [1.0, 2.0, 3.0]  # clear gaps
    close = np.stack([values + noise[0], values + noise[1], values - 0.3])[
        :, None
    ]  # runs 0 and 1 swap places
    ranks = mean_ranks(close, clusters, np.array([True]), SETTINGS)
    assert ranks.low[0] == 1.0 and ranks.high[0] == 2.0 and ranks.mean[2] == 3.0 == ranks.low[2]


def test_ratio_of_counts_metric_resamples_its_counts() -> None:
    """Gur et al. pixel accuracy is summed correct / summed labelled: its interval is of that ratio, not of the
    mean of per-image accuracies."""
    from caap.metrics.localisation import SegmentationPixelAccuracy

    metric = SegmentationPixelAccuracy()
    rng = np.random.default_rng(0)
    labelled = torch.tensor(rng.integers(10, 1000, size=50), dtype=torch.float64)
    correct = torch.floor(labelled * torch.tensor(rng.uniform(0.3, 0.9, size=50)))
    metric.counts.append(torch.stack([correct, labelled, *[torch.ones(50)] * 4], 1))
    metric.values.append(correct / labelled)
    metric.sample_index.append(torch.arange(50))
    metric.sample_class.append(torch.zeros(50, dtype=torch.long))
    low, high = metric.confidence_interval(SETTINGS)
    value = float(metric.statistic(metric.bootstrap_terms()[1].sum(0)))
    assert value == pytest.approx(float(correct.sum() / labelled.sum()))
    assert low < value < high

    def ratio_loop() -> tuple[float, float]:
        generator = np.random.default_rng(SETTINGS.seed)
        c, lab = correct.numpy(), labelled.numpy()
        ratios = [
            c[d].sum() / lab[d].sum()
            for d in (generator.integers(0, 50, 50) for _ in range(SETTINGS.resamples))
        ]
        return tuple(np.quantile(ratios, [0.025, 0.975]))

    assert (low, high) == pytest.approx(ratio_loop(), rel=1e-12)
