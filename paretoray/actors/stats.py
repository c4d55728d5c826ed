"""95% intervals for the figures a trial reports, computed over its samples.

* A mean of 0/1 scores (exact match, passkey retrieval): Wilson's score interval for a binomial
  proportion (scipy's `binomtest(...).proportion_ci(method="wilson")`); it stays inside [0, 1] and
  is honest at small n, where the normal approximation is not.
* A mean of graded scores (recall, F1, ROUGE-L): a percentile bootstrap over samples (2,000
  resamples drawn at once with numpy, seeded: the same samples give the same interval).
* A median (paired speedups): the distribution-free interval for a median from order statistics
  (the binomial(n, 1/2) quantiles pick the ranks), which assumes nothing about the shape of the
  timing noise. Below 6 values no pair of ranks reaches 95%; the interval is then [min, max],
  whose coverage is 1 - 2^(1-n) (75% at n = 3).
* A ratio of two means over the same samples (relative accuracy): a paired percentile bootstrap
  that resamples samples, keeping each sample's two scores together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=float)
    return array[np.isfinite(array)]


def mean_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Wilson for 0/1 values, a percentile bootstrap of the mean otherwise."""
    x = _finite(values)
    if x.size == 0:
        return math.nan, math.nan
    if np.all((x == 0) | (x == 1)):
        from scipy.stats import binomtest

        ci = binomtest(int(x.sum()), int(x.size)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        return float(ci.low), float(ci.high)
    if np.all(x == x[0]):  # one value, or no spread: a bootstrap has nothing to resample
        return float(x[0]), float(x[0])
    means = _bootstrap(x.size, seed, lambda idx: x[idx].mean(axis=-1))
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """Order-statistic interval for the median: ranks k and n+1-k with P(k <= rank of median) >= 95%."""
    x = np.sort(_finite(values))
    n = x.size
    if n == 0:
        return math.nan, math.nan
    from scipy.stats import binom

    # Largest k with P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2: then [x_(k), x_(n+1-k)] covers.
    k = int(binom.ppf((1 - CONFIDENCE) / 2, n, 0.5))
    if binom.cdf(k, n, 0.5) > (1 - CONFIDENCE) / 2:
        k -= 1
    k = max(k, 0)  # n < 6: no ranks reach 95%, the whole range it is
    return float(x[k]), float(x[n - 1 - k])


def ratio_of_means_interval(numerator: Sequence[float], denominator: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Paired percentile bootstrap of mean(numerator) / mean(denominator) over samples."""
    pairs = np.asarray(
        [(a, b) for a, b in zip(numerator, denominator) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)],
        dtype=float,
    )
    if pairs.size == 0:
        return math.nan, math.nan
    num, den = pairs[:, 0], pairs[:, 1]
    idx = _indices(len(num), seed)
    top, bottom = num[idx].mean(axis=-1), den[idx].mean(axis=-1)
    # A resample where dense scored nothing has no finite ratio: it counts as unbounded (+inf, or
    # NaN for 0/0, dropped), so that dense's zeros widen the interval instead of vanishing from it.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.where(top > 0, np.inf, np.nan))
    ratios = ratios[~np.isnan(ratios)]
    if ratios.size == 0:
        return math.nan, math.nan
    low = np.quantile(ratios, (1 - CONFIDENCE) / 2, method="lower")
    high = np.quantile(ratios, (1 + CONFIDENCE) / 2, method="higher")
    return float(low), float(high)


def _indices(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def _bootstrap(n: int, seed: int, statistic) -> np.ndarray:
    return statistic(_indices(n, seed))
