"""Paired bootstrap statistics over stored per-item and per-sequence outcomes.

Every trial with the same evaluation settings sees the same benchmark items and the
same held-out sequences, so two models are compared item by item: one bootstrap
replicate resamples each benchmark's items (with replacement) once and applies the
same draw to both models. That keeps the item-difficulty variance, which both
models share, out of the interval of their difference. Intervals are 95%
percentile intervals of N_BOOT replicates, with a fixed seed (reports are
reproducible). Pure numpy: no model, no harness.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
SEED = 0
_CHUNK = 250  # replicates per block: (block, items) weights stay small for 10k-item sets


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval; NaN everywhere when it cannot be computed."""

    value: float
    low: float
    high: float

    @classmethod
    def missing(cls) -> Estimate:
        return cls(math.nan, math.nan, math.nan)

    @property
    def ok(self) -> bool:
        return not any(math.isnan(v) for v in (self.value, self.low, self.high))

    def excludes(self, reference: float) -> bool:
        """True when the interval lies wholly on one side of `reference`."""
        return self.ok and (self.low > reference or self.high < reference)


def resampled_means(columns: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """columns (items, k): k paired outcomes per item -> (n_boot, k) column means, each
    replicate drawing the same items for all k columns (multinomial weights)."""
    n_items = columns.shape[0]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, _CHUNK):
        weights = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=min(_CHUNK, n_boot - start))
        out.append(weights @ columns / n_items)
    return np.concatenate(out)


def _interval(point: float, replicates: np.ndarray) -> Estimate:
    finite = replicates[np.isfinite(replicates)]
    if not math.isfinite(point) or len(finite) < 0.99 * len(replicates):
        return Estimate.missing()
    low, high = np.percentile(finite, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def benchmark_seed(seed: int, benchmark: str) -> int:
    """A seed for one benchmark's resampling: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{benchmark}".encode()).digest()[:8], "little")


def mean_ci(values, seed: int = SEED) -> Estimate:
    """The mean of independent units (e.g. held-out sequences) with its interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) < 2:
        return Estimate.missing()
    return _interval(float(values.mean()), resampled_means(values[:, None], seed=seed)[:, 0])


def paired_ci(statistic, per_benchmark: dict[str, np.ndarray], seed: int = SEED) -> Estimate:
    """`statistic(means)` where means maps benchmark -> (..., k) column means; evaluated
    on the data for the point estimate and on each paired replicate for the interval.
    per_benchmark: benchmark -> (items, k) outcomes of k models on the same items."""
    if not per_benchmark or any(len(cols) == 0 for cols in per_benchmark.values()):
        return Estimate.missing()
    # each benchmark draws its own items, with a seed derived from its name (so adding or
    # removing a benchmark changes no other benchmark's draws)
    replicates = {b: resampled_means(cols, seed=benchmark_seed(seed, b)) for b, cols in per_benchmark.items()}
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero denominator gives NaN: shown as n/a
        point = statistic({b: cols.mean(axis=0) for b, cols in per_benchmark.items()})
        return _interval(float(point), np.asarray(statistic(replicates), dtype=float))


def maintenance(means: dict[str, np.ndarray], variant: int = 0, dense: int = 1) -> np.ndarray:
    """100 x (benchmark average of the variant) / (that of the dense model): the paper's
    relative maintenance."""
    v = np.mean([m[..., variant] for m in means.values()], axis=0)
    d = np.mean([m[..., dense] for m in means.values()], axis=0)
    return 100 * v / d


def chance_normalized(chance: dict[str, float], variant: int = 0, dense: int = 1):
    """A statistic: 100 x sum(variant - chance) / sum(dense - chance) over benchmarks:
    the share of the dense model's above-chance accuracy that the variant keeps (0 =
    a guesser, 100 = the dense model). Sums, not a mean of ratios: one benchmark
    where the dense model is barely above chance cannot blow it up."""

    def statistic(means: dict[str, np.ndarray]) -> np.ndarray:
        above_v = sum(m[..., variant] - chance[b] for b, m in means.items())
        above_d = sum(m[..., dense] - chance[b] for b, m in means.items())
        return 100 * above_v / above_d

    return statistic


def maintenance_difference(means: dict[str, np.ndarray]) -> np.ndarray:
    """Columns (a, b, dense): maintenance of a minus maintenance of b, in points of %."""
    return maintenance(means, 0, 2) - maintenance(means, 1, 2)


def ratio_ci(numerator, denominator, seed: int = SEED) -> Estimate:
    """sum(numerator) / sum(denominator) over independent units (e.g. held-out documents: bits
    and bytes), with its interval: each replicate resamples the units once for both sums."""
    columns = np.column_stack([np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)])
    if columns.shape[0] < 2 or not np.isfinite(columns).all():
        return Estimate.missing()
    means = resampled_means(columns, seed=seed)
    return _interval(float(columns[:, 0].sum() / columns[:, 1].sum()), means[:, 0] / means[:, 1])
