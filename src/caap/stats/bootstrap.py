"""Cluster bootstrap over (image, class) pairs: confidence intervals of a run's metric values and mean curves.

Every metric value is a statistic of sums over the scored pairs (a mean is `sum(value) / count`). Pairs that
share an image are not independent (one image explains several classes), so the bootstrap resamples IMAGES
(clusters) with replacement and takes all pairs of each drawn image (Davison & Hinkley 1997, sec. 3.8). Each
resample is a row of weights `[n_images]` (how often each image was drawn); a statistic of the resampled sums
is then one matrix product for all resamples. Intervals are percentile intervals (Efron & Tibshirani 1993,
ch. 13). The random stream is `numpy.random.default_rng(seed)` drawing `integers(0, n_images, n_images)` once
per resample, so a plain loop over resamples with the same seed draws the same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

CHUNK_ELEMENTS = 1 << 22
"""Resample weights are built in blocks of at most this many entries (`[rows, n_images]`, 32 MB in float64)."""


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn: `resamples` image resamples from `numpy.random.default_rng(seed)`, a
    `level` (0.95) two-sided percentile interval. Recorded in metrics.json under `bootstrap`."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def record(self) -> dict[str, object]:
        """What metrics.json records: the settings plus the interval kind and the resampled unit."""
        return {**asdict(self), "interval": "percentile", "unit": "image"}


DEFAULT_SETTINGS = BootstrapSettings()


def cluster_sums(clusters: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """Per-cluster sums `[n, T]` of per-pair `terms [M, T]`, clusters (`[M]` image indices) in sorted order."""
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.zeros((int(inverse.max()) + 1 if inverse.size else 0, terms.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse.reshape(-1), terms)
    return sums


def resample_weights(n: int, settings: BootstrapSettings = DEFAULT_SETTINGS) -> Iterator[np.ndarray]:
    """Blocks `[rows, n]` of resample weights (float64 counts: how often each of `n` clusters was drawn), in
    all `settings.resamples` rows; resample r draws `default_rng(seed).integers(0, n, n)` as the r-th call."""
    rng = np.random.default_rng(settings.seed)
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, settings.resamples, rows):
        r = min(rows, settings.resamples - start)
        drawn = rng.integers(0, n, size=(r, n))
        flat = (np.arange(r)[:, None] * n + drawn).reshape(-1)
        yield np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def bootstrap_statistics(
    clusters: np.ndarray,
    terms: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    settings: BootstrapSettings = DEFAULT_SETTINGS,
) -> np.ndarray:
    """`statistic` of the image-resampled sums of per-pair `terms [M, T]`: `[R, ...]`, one row per resample.

    `statistic` maps sums `[..., T]` to values `[..., *shape]` (e.g. `s[..., 0] / s[..., 1]` for a mean)."""
    sums = cluster_sums(clusters, np.asarray(terms, dtype=np.float64).reshape(len(clusters), -1))
    blocks = [statistic(weights @ sums) for weights in resample_weights(sums.shape[0], settings)]
    return np.concatenate(blocks, axis=0)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval `(low, high)` `[...]` of bootstrap samples `[R, ...]` (resamples with a NaN
    statistic, e.g. an image draw without a defined value, are left out)."""
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isfinite(samples), samples, np.nan)
        if np.isnan(finite).all(axis=0).any():  # nanquantile warns on an all-NaN column: NaN bounds there
            out = np.full((2, *samples.shape[1:]), np.nan)
            ok = ~np.isnan(finite).all(axis=0)
            out[:, ok] = np.nanquantile(finite[:, ok], [tail, 1.0 - tail], axis=0)
            return out[0], out[1]
        low, high = np.nanquantile(finite, [tail, 1.0 - tail], axis=0)
    return low, high


def mean_terms(values: np.ndarray) -> np.ndarray:
    """Terms `[M, 2]` = (value, 1) of the finite per-pair values, (0, 0) of NaN ones: their sums' ratio is the
    mean over the finite values, the metrics' convention for undefined pairs."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return np.stack([np.where(finite, values, 0.0), finite.astype(np.float64)], axis=-1)


def ratio(sums: np.ndarray) -> np.ndarray:
    """`sums[..., 0] / sums[..., 1]` (NaN where the count is 0): the mean of `mean_terms`."""
    count = sums[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, sums[..., 0] / count, np.nan)


def mean_interval(
    values: np.ndarray, clusters: np.ndarray, settings: BootstrapSettings = DEFAULT_SETTINGS
) -> tuple[float, float]:
    """Percentile CI `(low, high)` of the mean of finite per-pair `values [M]`, images `clusters [M]` resampled."""
    if len(values) == 0:
        return float("nan"), float("nan")
    samples = bootstrap_statistics(clusters, mean_terms(values), ratio, settings)
    low, high = percentile_interval(samples, settings.level)
    return float(low), float(high)


def curve_band(
    curves: np.ndarray, clusters: np.ndarray, settings: BootstrapSettings = DEFAULT_SETTINGS
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band `(low [S], high [S])` of the mean curve of per-pair `curves [M, S]` (rows with
    a non-finite entry left out, as in the mean curve), images `clusters [M]` resampled jointly for all points."""
    curves = np.asarray(curves, dtype=np.float64)
    s = curves.shape[1]
    if curves.shape[0] == 0:
        return np.full(s, np.nan), np.full(s, np.nan)
    finite = np.isfinite(curves).all(1)
    terms = np.concatenate([np.where(finite[:, None], curves, 0.0), finite[:, None].astype(np.float64)], 1)

    def mean_curve(sums: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums[..., :s] / sums[..., s:]

    return percentile_interval(bootstrap_statistics(clusters, terms, mean_curve, settings), settings.level)


def format_value(value: float, interval: tuple[float, float] | list[float] | None, digits: int = 4) -> str:
    """`0.7625 [0.741, 0.783]`: a value with its CI one digit shorter (the value alone without a CI)."""
    if not math.isfinite(value):
        return "nan"
    if interval is None:
        return f"{value:.{digits}f}"
    low, high = interval
    return f"{value:.{digits}f} [{low:.{digits - 1}f}, {high:.{digits - 1}f}]"
