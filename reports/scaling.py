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
import pandas as pd

from reports.stats import N_BOOT, SEED, Estimate, ratio_ci, resampled_means

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


# ---- the scaling section: records -> tables (build.py renders them) ----

LN2 = math.log(2)
HEAD_SHARE = (
    0.5,
    "the output head is over half of the FLOPs per token of the converted model: cutting the FFN further "
    "saves little (the paper's attention bottleneck, at the head)",
)


def document_bits(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per held-out document: loss in bits, KL(dense || model) in bits, UTF-8 bytes; None for a
    token-cut held-out set (eval.heldout_documents: 0), which carries no bytes."""
    held = record.get("heldout") or {}
    if not held.get("per_sequence_bytes") or not held.get("per_sequence_tokens"):
        return None
    tokens = np.asarray(held["per_sequence_tokens"], dtype=float)
    loss = np.asarray(held["per_sequence_loss"], dtype=float) * tokens / LN2
    kl = held.get("per_sequence_kl")
    kl_bits = np.asarray(kl, dtype=float) * tokens / LN2 if kl else np.full(len(tokens), math.nan)
    return loss, kl_bits, np.asarray(held["per_sequence_bytes"], dtype=float)


def _same_documents(a, b) -> bool:
    return a is not None and b is not None and np.array_equal(a[2], b[2])


def gap_bits_per_byte(record: dict, dense: dict) -> Estimate:
    """(model's bits - dense model's bits) / bytes over the same documents, paired by document."""
    mine, theirs = document_bits(record), document_bits(dense)
    if not _same_documents(mine, theirs):
        return Estimate.missing()
    return ratio_ci(mine[0] - theirs[0], mine[2])


def kl_bits_per_byte(record: dict) -> Estimate:
    bits = document_bits(record)
    return Estimate.missing() if bits is None else ratio_ci(bits[1], bits[2])


def gap_difference(a: tuple[dict, dict], b: tuple[dict, dict]) -> Estimate:
    """Gap of a minus gap of b, bits per byte, each (record, its dense baseline), paired by document
    (every model reads the same documents)."""
    bits = [document_bits(r) for pair in (a, b) for r in pair]
    if not all(_same_documents(bits[0], other) for other in bits[1:]):
        return Estimate.missing()
    return ratio_ci((bits[0][0] - bits[1][0]) - (bits[2][0] - bits[3][0]), bits[0][2])


def weights_read(model: dict) -> dict | None:
    """Parameters, the FFN's share of them, and the weights a decode step reads: every matrix but
    the input embedding (one row of it; with tied embeddings the table is read whole as the head)."""
    keys = ("params", "n_layers", "hidden_size", "ffn_width", "vocab_size", "tied_embeddings")
    if any(model.get(k) is None for k in keys):
        return None
    ffn = model["n_layers"] * 3 * model["hidden_size"] * model["ffn_width"]
    read = model["params"] - (0 if model["tied_embeddings"] else model["vocab_size"] * model["hidden_size"])
    return {"params": model["params"], "ffn_params": ffn, "ffn_share_params": ffn / model["params"],
            "read": read, "ffn_share_read": ffn / read}  # fmt: skip


def ideal_decode(weights: dict, active: float) -> float:
    """Decode speedup if time were the bytes read: all of them against the converted model's."""
    return weights["read"] / (weights["read"] - (1 - active) * weights["ffn_params"])


def _conversion(record: dict) -> str:
    return f"{record['setting']} {record['recipe'] or 'paper'}"


def _baselines(records: list[dict]) -> dict[str, dict]:
    from reports.tables import dense_baselines

    return dense_baselines(records)


def size_rows(records: list[dict], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model and conversion at the budget most models share: what the model is,
    what the conversion kept (bits per byte, chance-normalized maintenance) and saved."""
    from reports.tables import completed, eval_key

    done = [r for r in completed(records) if r["config"].get("factor")]
    budget = _common_budget(done)
    dense = _baselines(records)
    rows = []
    for r in done:
        base = dense.get(eval_key(r))
        weights = weights_read(r.get("model") or {})
        if base is None or r["config"]["train"]["data_budget_tokens"] != budget:
            continue
        f = frame[frame["trial_id"] == r["trial_id"]].iloc[0]
        row = {"model": r["config"]["model"], "conversion": _conversion(r), "active_pct": 100 * r["active_fraction"],
               "budget": budget, "seed": r["config"].get("seed", 0)}  # fmt: skip
        row |= _model_columns(weights, r["active_fraction"])
        for name, e in (("gap_bpb", gap_bits_per_byte(r, base)), ("kl_bpb", kl_bits_per_byte(r))):
            row |= {name: e.value, f"{name}_lo": e.low, f"{name}_hi": e.high}
        for name in ("cn_maintenance_pct", "ffn_reduction_pct", "total_reduction_pct", "decode_speedup",
                     "served_decode_speedup", "head_share"):  # fmt: skip
            for suffix in ("", "_lo", "_hi", "_min", "_max"):
                if name + suffix in f:
                    row[name + suffix] = f[name + suffix]
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["conversion", "params_m", "seed"]) if rows else pd.DataFrame()


def _model_columns(weights: dict | None, active: float) -> dict:
    names = ("params_m", "ffn_share_params", "ffn_share_read", "ideal_decode")
    if weights is None:
        return dict.fromkeys(names, math.nan)
    values = (weights["params"] / 1e6, 100 * weights["ffn_share_params"], 100 * weights["ffn_share_read"],
              ideal_decode(weights, active))  # fmt: skip
    return dict(zip(names, values))


def _common_budget(records: list[dict]) -> int | None:
    """The data budget the most models were converted at (ties: the smaller budget)."""
    models: dict[int, set] = {}
    for r in records:
        models.setdefault(r["config"]["train"]["data_budget_tokens"], set()).add(r["config"]["model"])
    return min(models, key=lambda b: (-len(models[b]), b)) if models else None


@dataclass(frozen=True)
class BudgetCurve:
    """One conversion of one model at several budgets: the gap to dense per budget (nats per
    token, paired by held-out sequence), and the fit, or why there is none."""

    model: str
    conversion: str
    tokens: list[int]
    gaps: list[Estimate]
    fit: PowerLawFit | None
    refused: str | None


def budget_curves(records: list[dict]) -> list[BudgetCurve]:
    """Every (model, conversion) measured at two or more data budgets."""
    from reports.tables import completed, eval_key, paired_sequences

    dense = _baselines(records)
    groups: dict[tuple, dict[int, dict]] = {}
    for r in completed(records):
        if r["config"].get("factor") and eval_key(r) in dense:
            key = (r["config"]["model"], _conversion(r), r["config"].get("seed"))
            groups.setdefault(key, {})[r["config"]["train"]["data_budget_tokens"]] = r
    curves = []
    for (model, conversion, _), by_budget in sorted(groups.items(), key=str):
        if len(by_budget) < 2:
            continue
        tokens = sorted(by_budget)
        base = dense[eval_key(by_budget[tokens[0]])]
        gaps = [paired_sequences([by_budget[t], base], "per_sequence_loss") for t in tokens]
        per_sequence = np.array(
            [
                np.asarray(by_budget[t]["heldout"]["per_sequence_loss"]) - base["heldout"]["per_sequence_loss"]
                for t in tokens
            ]  # fmt: skip
        )
        fit, refused = None, None
        try:
            fit = fit_power_law(tokens, per_sequence)
        except FitRefused as error:
            refused = str(error)
        curves.append(BudgetCurve(model, conversion, tokens, gaps, fit, refused))
    return curves


def size_answer(rows: pd.DataFrame, records: list[dict]) -> list[str]:
    """At equal data, per 50%-active conversion: is the gap (bits per byte) smaller on the largest
    model than on the smallest? Each difference is paired by document within one training seed;
    its interval resamples documents, not training runs. With several seeds, an answer only where
    every seed's interval excludes zero on the same side."""
    from reports.tables import completed, eval_key

    if rows.empty:
        return []
    dense, out = _baselines(records), []
    by_key = {(r["config"]["model"], _conversion(r), r["config"]["train"]["data_budget_tokens"],
               r["config"].get("seed", 0)): r for r in completed(records) if r["config"].get("factor")}  # fmt: skip
    for conversion, group in rows[rows["active_pct"] == 50].groupby("conversion"):
        sized = group.dropna(subset=["params_m", "gap_bpb"]).sort_values("params_m")
        if sized["model"].nunique() < 2:
            continue
        small, large = sized.iloc[0], sized.iloc[-1]
        seeds = sorted(
            set(sized[sized["model"] == small["model"]]["seed"]) & set(sized[sized["model"] == large["model"]]["seed"])
        )
        diffs = {}
        for seed in seeds:
            a = by_key[(large["model"], conversion, large["budget"], seed)]
            b = by_key[(small["model"], conversion, small["budget"], seed)]
            diff = gap_difference((a, dense[eval_key(a)]), (b, dense[eval_key(b)]))
            if diff.ok:
                diffs[seed] = diff
        if not diffs:
            continue
        gaps = {m: sized[sized["model"] == m].set_index("seed")["gap_bpb"] for m in (small["model"], large["model"])}
        out.append(_size_sentence(conversion, small, large, diffs, gaps))
    return out


def _size_sentence(conversion: str, small, large, diffs: dict[int, Estimate], gaps: dict) -> str:
    """The size answer for one conversion: large minus small, per seed (dict seed -> Estimate)."""
    larger, smaller = all(d.low > 0 for d in diffs.values()), all(d.high < 0 for d in diffs.values())
    sign = -1 if smaller else 1  # "smaller by" prints positive numbers
    several = len(diffs) > 1
    each = ", ".join(
        f"{sign * d.value:.3f} [{min(sign * d.low, sign * d.high):.3f}, {max(sign * d.low, sign * d.high):.3f}]"
        + (f" (seed {seed})" if several else "")
        for seed, d in diffs.items()
    )
    if larger or smaller:
        runs = f"in each of {len(diffs)} training seeds " if several else ""
        verdict = f"{'larger' if larger else 'smaller'} on {large['model']} {runs}by {each} bits per byte"
    else:
        runs = f"across {len(diffs)} training seeds " if several else ""
        verdict = f"not distinguishable between the two {runs}(difference {each} bits per byte)"
    note = (
        "each interval resamples held-out documents within one training seed"
        if several
        else "one training run each: the interval resamples held-out documents, not training runs"
    )

    def gap(model) -> str:
        values = [gaps[model][seed] for seed in diffs]
        return f"{min(values):.3f}" if len(values) == 1 else f"{min(values):.3f}-{max(values):.3f}"

    return (
        f"At {int(large['budget']):,} tokens, the 50% conversion {conversion}'s gap to dense is {verdict}: "
        f"{large['model']} ({large['params_m']:.0f}M parameters) {gap(large['model'])} against "
        f"{small['model']} ({small['params_m']:.0f}M) {gap(small['model'])}, paired by held-out document ({note})."
    )


def head_flags(rows: pd.DataFrame) -> list[str]:
    """The output-head bottleneck, per model (HEAD_SHARE)."""
    out = []
    for _, r in rows.iterrows():
        if r.get("head_share", math.nan) > HEAD_SHARE[0]:
            out.append(
                f"output-head bottleneck: the LM head is {100 * r['head_share']:.0f}% of {r['model']} "
                f"{r['conversion']}'s FLOPs per token"
            )
    return out
