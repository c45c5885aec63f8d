"""How the gap to the dense model falls with training data: a saturating power law,
gap(T) = c + a * T^(-b), fitted to measured gaps, with bootstrap intervals and projections.

c is the gap that more data of this kind would not remove, a and b how fast the rest goes.
The gaps of all budgets are measured on the same held-out sequences, so one bootstrap
replicate resamples the sequences once (the same draw for every budget) and refits. The fit
is by variable projection: for each b on a log grid (B_GRID), c and a have a closed-form
least-squares solution; the b with the smallest squared error wins. Pure numpy.

The fit refuses, with the reason, where the data cannot determine it (`FitRefused`):
fewer than 4 budgets (3 parameters need one degree of freedom beside them), a gap that does
not fall with data (flat within its interval, or rising), or a best b at the edge of its grid
(the saturation is not pinned down). A projection beyond the largest measured budget is an
extrapolation and says so; where more than 2.5% of the replicates never reach the target (it
is at or below their c), its interval has no upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reports.stats import N_BOOT, SEED, Estimate, resampled_means

B_GRID = np.exp(np.linspace(math.log(0.02), math.log(4.0), 241))  # exponents tried; steps of 2.2%
MIN_BUDGETS = 4
PAPER_TOKENS = 30e6  # the paper's lower figure: 30-50M tokens (FACTORLLM.md)


class FitRefused(ValueError):
    """The measured gaps cannot determine the power law; the message says why."""


@dataclass(frozen=True)
class PowerLawFit:
    """gap(T) = c + a * T^(-b): point estimates, intervals, and the bootstrap replicates behind them."""

    c: Estimate
    a: Estimate
    b: Estimate
    max_tokens: float  # the largest measured budget: beyond it a projection extrapolates
    replicates: np.ndarray  # (n, 3): c, a, b of each usable bootstrap replicate
    point: tuple[float, float, float]

    def gap_at(self, tokens: float) -> Estimate:
        """The projected gap at `tokens`, with its interval."""
        c, a, b = self.point
        values = self.replicates[:, 0] + self.replicates[:, 1] * tokens ** -self.replicates[:, 2]
        low, high = np.percentile(values, [2.5, 97.5])
        return Estimate(c + a * tokens**-b, float(low), float(high))

    def tokens_for(self, gap: float) -> Estimate:
        """Training tokens at which the gap falls to `gap`, with its interval; inf where the
        curve levels off at or above it (then `high` is inf: no upper bound)."""
        point = _tokens_for(np.array([self.point]), gap)[0]
        # nearest rank: inf (never reached) replicates take part without interpolating
        low, high = np.percentile(_tokens_for(self.replicates, gap), [2.5, 97.5], method="nearest")
        return Estimate(float(point), float(low), float(high))

    def extrapolates(self, tokens: float) -> bool:
        return tokens > self.max_tokens


def _tokens_for(params: np.ndarray, gap: float) -> np.ndarray:
    c, a, b = params.T
    with np.errstate(divide="ignore", invalid="ignore"):
        tokens = (a / (gap - c)) ** (1 / b)
    return np.where(gap > c, tokens, math.inf)


def _fit_many(log_tokens: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """gaps (replicates, budgets) -> (replicates, 4): c, a, b, and whether b is inside its grid."""
    z = np.exp(-B_GRID[:, None] * log_tokens[None, :])  # (grid, budgets): T^-b
    zc = z - z.mean(axis=1, keepdims=True)
    yc = gaps - gaps.mean(axis=1, keepdims=True)  # (replicates, budgets)
    a = yc @ zc.T / (zc**2).sum(axis=1)  # (replicates, grid): least-squares slope per b
    c = gaps.mean(axis=1, keepdims=True) - a * z.mean(axis=1)
    sse = ((c[:, :, None] + a[:, :, None] * z[None] - gaps[:, None, :]) ** 2).sum(axis=2)
    best = sse.argmin(axis=1)
    rows = np.arange(len(gaps))
    inside = (best > 0) & (best < len(B_GRID) - 1)
    return np.column_stack([c[rows, best], a[rows, best], B_GRID[best], inside])


def fit_power_law(tokens, gaps: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> PowerLawFit:
    """tokens: the training budgets; gaps: (budgets, sequences) per-sequence gaps to the
    dense model, the same sequences in every row. Raises FitRefused where not identifiable."""
    tokens = np.asarray(tokens, dtype=float)
    gaps = np.asarray(gaps, dtype=float)
    if len(set(tokens.tolist())) < MIN_BUDGETS:
        raise FitRefused(
            f"{len(set(tokens.tolist()))} budgets: a saturating power law (3 parameters) needs at least "
            f"{MIN_BUDGETS} to be fitted with a degree of freedom left"
        )
    order = np.argsort(tokens)
    tokens, gaps = tokens[order], gaps[order]
    drop = resampled_means((gaps[0] - gaps[-1])[:, None], n_boot=n_boot, seed=seed)[:, 0]
    fall = float((gaps[0] - gaps[-1]).mean())
    if fall <= 0 or np.percentile(drop, 2.5) <= 0:
        raise FitRefused(
            f"the gap does not fall with data: {tokens[0]:,.0f} -> {tokens[-1]:,.0f} tokens changes it by "
            f"{-fall:+.3f} [{-np.percentile(drop, 97.5):+.3f}, {-np.percentile(drop, 2.5):+.3f}]"
        )
    log_tokens = np.log(tokens)
    point = _fit_many(log_tokens, gaps.mean(axis=1)[None])[0]
    if not point[3]:
        raise FitRefused(
            f"the best exponent b = {point[2]:.3g} lies at the edge of the range tried "
            f"[{B_GRID[0]:.2g}, {B_GRID[-1]:.2g}]: the curve's saturation is not determined by these budgets"
        )
    if point[1] <= 0:
        raise FitRefused("the fitted curve rises with data (a <= 0)")
    replicates = resampled_means(gaps.T, n_boot=n_boot, seed=seed)  # (n_boot, budgets), sequences resampled
    fits = _fit_many(log_tokens, replicates)
    usable = fits[(fits[:, 3] == 1) & (fits[:, 1] > 0)][:, :3]
    if len(usable) < 0.95 * n_boot:
        raise FitRefused(
            f"{n_boot - len(usable)} of {n_boot} bootstrap replicates have no interior fit: the interval "
            "would have no bound"
        )
    estimates = [Estimate(float(point[i]), *np.percentile(usable[:, i], [2.5, 97.5]).tolist()) for i in range(3)]
    return PowerLawFit(*estimates, float(tokens[-1]), usable, tuple(float(v) for v in point[:3]))
