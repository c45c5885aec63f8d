""" "What this sweep shows": a short paragraph generated from the numbers.

Every sentence that compares two things is written from an interval: a difference
is called a difference only when its 95% interval excludes zero (or 100% for
maintenance against the dense model); otherwise the sentence says the data cannot
tell them apart. Point values are never compared on their own.
"""

from __future__ import annotations

import math

import pandas as pd

from .stats import Estimate


def estimate(row, name: str) -> Estimate:
    return Estimate(row[name], row[f"{name}_lo"], row[f"{name}_hi"])


def show(e: Estimate, digits: int = 1, unit: str = "") -> str:
    if math.isnan(e.value):
        return "n/a"
    if not e.ok:
        return f"{e.value:.{digits}f}{unit} (no interval)"
    return f"{e.value:.{digits}f}{unit} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def _variant_name(row) -> str:
    budget = "" if math.isnan(row["budget"]) else f", {int(row['budget']):,} tokens"
    recipe = "" if row.get("recipe", "paper") in ("paper", "-") else f", {row['recipe']}"
    return f"{row['setting']} {row['router_mode']} ({row['partition']}{recipe}{budget})"


def dense_sentence(dense, n_tasks: int) -> str:
    at_chance = [b for b in dense["dense_at_chance"].split(",") if b]
    if math.isnan(estimate(dense, "average").value) and len(at_chance) == n_tasks:  # no benchmark results
        return (
            f"The dense {dense['model']} has no benchmark results here (eval.benchmarks: false) and reaches "
            f"held-out LM loss {show(estimate(dense, 'heldout_loss'), 3)} nats: the held-out loss and KL are the "
            "measures to read."
        )
    text = (
        f"The dense {dense['model']} averages {show(estimate(dense, 'average'), 3)} over {n_tasks} "
        f"benchmarks and reaches held-out LM loss {show(estimate(dense, 'heldout_loss'), 3)} nats."
    )
    if len(at_chance) == n_tasks:
        text += (
            " On none of them is its accuracy above chance at 95% confidence at this sample size, so the "
            "benchmarks cannot tell a broken model from a good one here: chance-normalized maintenance is "
            "n/a, raw maintenance is shown but says little, and the held-out loss and KL are the measures "
            "to read."
        )
    elif at_chance:
        text += (
            f" On {len(at_chance)} of them ({', '.join(at_chance)}) its accuracy is not above chance at "
            f"95% confidence: there, raw maintenance cannot tell a broken model from a good one, and the "
            f"chance-normalized figure leaves them out."
        )
    return text


def variant_sentence(row) -> str:
    name = _variant_name(row)
    loss, kl, delta = (
        estimate(row, "heldout_loss"),
        estimate(row, "kl_from_dense"),
        estimate(row, "delta_loss_vs_dense"),
    )
    maint, cn = estimate(row, "maintenance_pct"), estimate(row, "cn_maintenance_pct")
    parts = [f"{name}: held-out loss {show(loss, 2)}"]
    if delta.ok:
        parts.append(
            f"{'above' if delta.low > 0 else 'below' if delta.high < 0 else 'not distinguishable from'} "
            f"the dense model's" + (f" by {show(delta, 2)} nats" if delta.excludes(0) else "")
        )
    parts.append(f"KL(dense || model) {show(kl, 3)}")
    text = "; ".join(parts)
    if math.isnan(maint.value):
        return text + ". Benchmark maintenance n/a (a benchmark is missing, or its items are not paired)."
    text += f". It keeps {show(maint)}% of the dense benchmark average"
    if not maint.ok:
        return text + "."
    if maint.excludes(100):
        text += f" ({'below' if maint.high < 100 else 'above'} the dense model)"
    else:
        text += " (not distinguishable from the dense model at this sample size)"
    if cn.ok:
        text += f"; chance-normalized {show(cn)}%: {_versus_guessing(cn)}"
    return text + "."


def _versus_guessing(cn: Estimate) -> str:
    """Where a chance-normalized interval lies: 0 = guessing, 100 = the dense model."""
    if not cn.excludes(0):
        return "not distinguishable from guessing"
    if cn.high < 0:
        return "below guessing"
    if not cn.excludes(100):
        return "above guessing, not distinguishable from the dense model"
    return "above guessing, below the dense model"


def pair_sentence(pair) -> str:
    parts = []
    for label, prefix, digits, unit in (
        ("held-out loss", "loss_diff", 3, " nats"),
        ("benchmark maintenance", "maintenance_diff", 1, " points"),
    ):
        e = estimate(pair, prefix)
        if not e.ok:
            continue
        if e.excludes(0):
            parts.append(f"{label} a − b = {show(e, digits)}{unit} (a {'higher' if e.low > 0 else 'lower'})")
        else:
            parts.append(f"{label} not distinguishable ({show(e, digits)}{unit}, interval includes 0)")
    return (
        f"a = {pair['a']} vs b = {pair['b']} (differ in {pair['factor']}): "
        + "; ".join(parts or ["no paired data"])
        + "."
    )


def findings(frame: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """The paragraph, as sentences (markdown list items)."""
    lines = []
    for model in frame["model"].unique():
        rows = frame[frame["model"] == model]
        dense = rows[rows["is_dense"]]
        if len(dense):
            lines.append(dense_sentence(dense.iloc[0], len(dense.iloc[0]["tasks"])))
        lines += [variant_sentence(row) for _, row in rows[~rows["is_dense"]].iterrows()]
        lines += [pair_sentence(pair) for _, pair in pairs[pairs["model"] == model].iterrows()]
    lines.append(
        "Intervals are 95% paired bootstrap intervals (benchmark items and held-out sequences "
        "resampled jointly for the models compared). What these numbers do not show: accuracy "
        "on items outside the sample, quality at other training budgets, or speed on other hardware."
    )
    return lines
