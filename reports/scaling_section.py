"""The report's Scaling section: quality and speed against model size and data budget
(reports/scaling.py computes; this renders markdown and plots). It appears when a sweep
converts several models at one budget, or one model at several budgets; otherwise the
report carries one line pointing to experiments/scaling.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import plots
from .findings import show
from .scaling import HEAD_SHARE, PAPER_TOKENS, BudgetCurve, budget_curves, head_flags, size_answer, size_rows
from .stats import Estimate
from .tables import failure_flags

POINTER = (
    "Scaling with model size and data budget: this sweep converts one model at one budget per recipe. "
    "`experiments/scaling.yaml` runs the scaling study, and its report has a Scaling section."
)
TARGET_GAPS = (1.0, 0.5)  # nats per token: the gaps whose training tokens are projected


def scaling_section(frame: pd.DataFrame, records: list[dict], out_dir: Path) -> list[str]:
    rows, curves = size_rows(records, frame), budget_curves(records)
    if (rows.empty or rows["model"].nunique() < 2) and not curves:
        return [POINTER, ""]
    lines = ["## Scaling", "", *_answers(rows, records, curves), ""]
    if not rows.empty and rows["model"].nunique() >= 2:
        lines += _size(rows, out_dir)
    if curves:
        lines += _budget(curves, out_dir)
    lines += _failures(frame, rows)
    return lines


def _answers(rows: pd.DataFrame, records: list[dict], curves: list[BudgetCurve]) -> list[str]:
    out = [f"- {s}" for s in size_answer(rows, records)]
    for c in curves:
        if c.fit is not None:
            out.append(
                f"- {c.model} {c.conversion}, training tokens to come within {TARGET_GAPS[0]:g} nat per token of "
                f"dense: {_reach(c, TARGET_GAPS[0])}."
            )
    return out or ["- The sweep holds no comparison across sizes or budgets with an interval yet."]


def _size(rows: pd.DataFrame, out_dir: Path) -> list[str]:
    budget = int(rows["budget"].iloc[0])
    header = ["model", "params (M)", "FFN % of params", "FFN % of bytes read / token", "conversion", "active %",
              "gap to dense (bits/byte)", "KL (bits/byte)", "chance-norm. maint. %", "FFN cut %", "total cut %",
              "eager decode x", "served decode x", "ideal decode x"]  # fmt: skip
    seeds = rows["seed"].nunique() > 1  # one row per training run: their spread is the run-to-run variance
    header = header[:5] + ["seed"] * seeds + header[5:]
    lines = [f"### Against model size, at {budget:,} training tokens", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for _, r in rows.iterrows():
        cells = [r["model"], _num(r["params_m"], 0), _num(r["ffn_share_params"], 1), _num(r["ffn_share_read"], 1),
                 r["conversion"], _num(r["active_pct"], 1), _ci(r, "gap_bpb", 3), _ci(r, "kl_bpb", 3),
                 _ci(r, "cn_maintenance_pct", 1), _num(r.get("ffn_reduction_pct"), 1),
                 _num(r.get("total_reduction_pct"), 1), _range(r, "decode_speedup"),
                 _range(r, "served_decode_speedup"), _num(r["ideal_decode"], 2)]  # fmt: skip
        cells[5:5] = [str(int(r["seed"]))] * seeds
        lines.append("| " + " | ".join(cells) + " |")
    if rows["gap_bpb"].isna().all():
        lines += ["", "Gap and KL in bits per byte are n/a: this sweep's held-out text is cut by tokens, which cover "
                  "different text for each tokenizer; `eval.heldout_documents` measures every model on the same "
                  "documents (experiments/scaling.yaml)."]  # fmt: skip
    lines += [
        "",
        "Bits per byte: nats summed over the same held-out documents for every model, / ln 2, over their UTF-8 "
        "bytes (nats per token depend on each tokenizer); intervals resample documents, paired with each model's "
        "own dense baseline. Bytes read per decoded token: every weight matrix but the input embedding (one row; a "
        "tied table is read whole as the head). Ideal decode x: the dense model's bytes over the converted one's. "
        "Served decode x: llama.cpp, where the trial asked for it (latency.engine) and the model exports exactly.",
        "",
    ]
    for name, draw in (("gap_vs_params.png", plots.gap_vs_params), ("decode_vs_params.png", plots.decode_vs_params)):
        if draw(rows, out_dir / name):
            lines += [f"![{name}]({name})", ""]
    return lines


def _budget(curves: list[BudgetCurve], out_dir: Path) -> list[str]:
    lines = ["### Against data budget", ""]
    for c in curves:
        gaps = ", ".join(f"{t:,}: {show(g, 3)}" for t, g in zip(c.tokens, c.gaps))
        lines += [f"**{c.model} {c.conversion}**: gap to dense (nats per token, paired by sequence) {gaps}.", ""]
        if c.fit is None:
            lines += [f"No fit of gap(T) = c + a·T^-b: {c.refused}.", ""]
            continue
        f = c.fit
        lines += [
            f"Fit gap(T) = c + a·T^-b: c = {show(f.c, 3)}, a = {show(f.a, 3)}, b = {show(f.b, 3)} "
            "(c: the gap more of this data would not remove).",
            "",
        ]
        lines += [f"- tokens to a {gap:g}-nat gap: {_reach(c, gap)}" for gap in TARGET_GAPS]
        where = "extrapolation" if f.extrapolates(PAPER_TOKENS) else "within the measured budgets"
        at_paper = show(f.gap_at(PAPER_TOKENS), 3)
        lines += [f"- gap at the paper's {PAPER_TOKENS / 1e6:.0f}M tokens: {at_paper} nats ({where})", ""]
    if plots.gap_vs_tokens(curves, out_dir / "gap_vs_tokens.png"):
        lines += ["![gap_vs_tokens.png](gap_vs_tokens.png)", ""]
    lines += [
        "Projections extrapolate a curve fitted over the measured budgets; their intervals resample held-out "
        "sequences (the same for every budget) and refit, and say nothing of how the trend could bend beyond "
        "them. A fit needs at least 4 budgets and a gap that falls with data.",
        "",
    ]
    return lines


def _failures(frame: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    lines = ["### Failure modes across scale", ""]
    for model in frame["model"].unique():
        variants = frame[(frame["model"] == model) & ~frame["is_dense"]]
        seeds = variants["seed"].nunique() > 1
        flags = [flag for _, row in variants.iterrows() for flag in failure_flags(row, frame, _run_name(row, seeds))]
        flags += head_flags(rows[rows["model"] == model]) if not rows.empty else []
        lines += [
            f"- {model}:"
            + ("".join(f"\n  - {flag}" for flag in flags) if flags else " no failure mode crossed its threshold")
        ]
    lines += ["", f"Output head: threshold {HEAD_SHARE[0]}: {HEAD_SHARE[1]}. Other thresholds: listed above.", ""]
    return lines


def _run_name(row, seeds: bool) -> str:
    """A variant as a failure finding names it: setting, router mode, budget, and the seed where a model has several."""
    seed = f", seed {int(row['seed'])}" if seeds else ""
    return f"{row['setting']} {row['router_mode']} ({int(row['budget']):,} tokens{seed})"


def _reach(curve: BudgetCurve, gap: float) -> str:
    """Tokens to a gap, with the interval, and whether that is measured or extrapolated."""
    e, fit = curve.fit.tokens_for(gap), curve.fit
    if math.isinf(e.value):
        return f"not reached at this rate: the fitted floor c = {show(fit.c, 3)} lies above it"
    high = "no upper bound" if math.isinf(e.high) else f"{e.high:,.0f}"
    if fit.extrapolates(e.value):
        where = f"an extrapolation beyond the {fit.max_tokens:,.0f} tokens measured"
    elif fit.extrapolates(e.high):
        where = f"its upper end extrapolates beyond the {fit.max_tokens:,.0f} tokens measured"
    else:
        where = "within the measured budgets"
    return f"{e.value:,.0f} [{e.low:,.0f}, {high}] ({where})"


def _num(value, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ci(row, name: str, digits: int) -> str:
    return show(Estimate(row[name], row[f"{name}_lo"], row[f"{name}_hi"]), digits) if name in row else "n/a"


def _range(row, name: str) -> str:
    if math.isnan(row.get(name, math.nan)):
        return "n/a"
    return f"{row[name]:.2f} ({row[f'{name}_min']:.2f}-{row[f'{name}_max']:.2f})"
