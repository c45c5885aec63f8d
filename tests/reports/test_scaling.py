"""The saturating power-law fit of the gap against training tokens, on synthetic gaps."""

import math

import numpy as np
import pytest

from reports.scaling import FitRefused, fit_power_law

BUDGETS = [5_000, 20_000, 80_000, 320_000, 1_280_000]


def synthetic(c, a, b, budgets=BUDGETS, sequences=64, noise=0.3, seed=0):
    """(budgets, sequences) per-sequence gaps around c + a T^-b; each sequence has its own
    difficulty, shared by every budget (as held-out sequences are)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, noise, sequences)
    return np.array([c + a * t**-b + difficulty + rng.normal(0, noise / 5, sequences) for t in budgets])


def test_the_fit_recovers_known_parameters_within_its_intervals():
    c, a, b = 0.8, 60.0, 0.45
    fit = fit_power_law(BUDGETS, synthetic(c, a, b))
    assert fit.c.low <= c <= fit.c.high and fit.b.low <= b <= fit.b.high and fit.a.low <= a <= fit.a.high
    assert abs(fit.b.value - b) < 0.1 and abs(fit.c.value - c) < 0.15
    gap = fit.gap_at(30e6)  # an extrapolation to the paper's budget
    assert gap.low <= c + a * 30e6**-b <= gap.high


def test_projected_tokens_carry_an_interval_and_are_unbounded_below_the_floor():
    c, a, b = 0.8, 60.0, 0.45
    fit = fit_power_law(BUDGETS, synthetic(c, a, b))
    truth = (a / (0.9 - c)) ** (1 / b)  # tokens to a gap of 0.9
    reach = fit.tokens_for(0.9)
    assert reach.low <= truth <= reach.high and math.isfinite(reach.high)
    assert fit.extrapolates(reach.value)  # beyond the measured budgets
    below = fit.tokens_for(0.5)  # under c: never reached at this rate
    assert below.value == math.inf and below.high == math.inf
    near = fit.tokens_for(c + 0.02)  # close to c: some replicates never get there
    assert near.high == math.inf


@pytest.mark.parametrize(
    "budgets,gaps,message",
    [
        (BUDGETS[:2], None, "2 budgets: a saturating power law"),
        (BUDGETS[:3], None, "3 budgets"),
        (BUDGETS, "flat", "the gap does not fall with data"),
        (BUDGETS, "rising", "the gap does not fall with data"),
        (BUDGETS, "linear", "at the edge of the range tried"),
    ],
)
def test_a_curve_the_data_cannot_determine_is_refused_with_the_reason(budgets, gaps, message):
    if gaps is None:
        data = synthetic(0.8, 60.0, 0.45, budgets=budgets)
    elif gaps == "flat":
        data = synthetic(2.0, 0.0, 0.5)
    elif gaps == "rising":
        data = synthetic(2.0, -30.0, 0.3)
    else:  # falls by the same step per doubling without levelling off: b -> 0, c -> -inf
        rng = np.random.default_rng(1)
        data = np.array([6.0 - 0.5 * math.log2(t / 5000) + rng.normal(0, 0.05, 64) for t in budgets])
    with pytest.raises(FitRefused, match=message):
        fit_power_law(budgets, data)
