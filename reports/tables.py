"""Records -> pandas DataFrames. Pure functions of the records: no model, no Ray,
nothing from harness/ (a record says everything a report needs).

A variant is compared with the dense baseline that saw the same evaluation (model,
every eval setting, evaluation dtype and device type): the same benchmark items and
the same held-out sequences, so every comparison is paired (reports/stats.py).
Relative maintenance = 100 x the variant's benchmark average / the dense model's.
An average exists only when every configured benchmark is present: a missing metric
stays missing (NaN, shown as "n/a"), never a default number.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from . import stats
from .record import EVAL_ADDED_LATER, active_pct
from .stats import Estimate

# Each report metric's better direction, in one place.
DIRECTIONS = {
    "average": "higher",
    "maintenance_pct": "higher",
    "cn_maintenance_pct": "higher",
    "heldout_loss": "lower",
    "kl_from_dense": "lower",
    "ffn_gflops": "lower",
    "total_gflops": "lower",
    "attention_gflops": "lower",
    "ffn_reduction_pct": "higher",
    "total_reduction_pct": "higher",
    "prefill_speedup": "higher",
    "decode_speedup": "higher",
    "served_prefill_speedup": "higher",
    "served_decode_speedup": "higher",
    "expert_similarity": "lower",
    "router_agreement": "higher",
    "load_max_over_mean": "lower",
    "routing_entropy_normalized": "higher",
    "attention_share": "lower",
    "churn_late": "lower",
}

# Failure-mode thresholds, each with the reason the report prints beside it.
THRESHOLDS = {
    "router_conflict_excess_agreement": (
        0.5,
        "R > 1 routers: agreement above chance, (agreement - K/N) / (1 - K/N), below 0.5. Two "
        "independent routers share K/N of their top-K picks by chance; below halfway from chance to "
        "full agreement, the averaged softmax mixes routers that disagree more than they agree",
    ),
    "expert_collapse_rise": (
        0.10,
        "mean pairwise cosine similarity of the experts' outputs rose by more than 0.10 since "
        "factorization (and is above the sweep's random/frozen-router trial of the same setting, "
        "where there is one): training made the experts more alike, the collapse the paper reports",
    ),
    "load_imbalance_max_over_mean": (2.0, "the busiest expert gets more than twice the mean load on the probe text"),
    "attention_share": (
        0.5,
        "attention is over half of the FLOPs per token and at least 10 points more than in the dense "
        "model at the same length: cutting the FFN further saves little",
    ),
    "attention_share_rise": (0.10, "see attention_share"),
    "no_speed_gain_flops_saved": (
        0.10,
        "total FLOPs down by 10% or more, but no timed round was faster than the dense model "
        "(interleaved rounds, same device): the saving stayed on paper",
    ),
    "late_churn": (
        0.10,
        "mean routing churn over the last third of training above 0.10: more than one probe token "
        "in ten still changes its expert set between measurements, so the router has not settled",
    ),
}


def threshold(name: str) -> float:
    return THRESHOLDS[name][0]


def task_order(records: list[dict]) -> list[str]:
    """The benchmarks the records were configured with, in the order they list them."""
    return list(dict.fromkeys(t for r in records for t in r["config"]["eval"]["tasks"]))


def eval_key(record: dict) -> str:
    """What makes two trials' evaluations comparable item for item."""
    cfg = record["config"]
    device = (record.get("environment") or {}).get("device", "?").split(":")[0]
    evaluation = {k: v for k, v in cfg["eval"].items() if EVAL_ADDED_LATER.get(k, object()) != v}
    return json.dumps([cfg["model"], evaluation, record.get("eval_dtype"), device], sort_keys=True)


def completed(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "completed"]


def dense_baselines(records: list[dict]) -> dict[str, dict]:
    return {eval_key(r): r for r in completed(records) if not r["config"].get("factor")}


def trial_frame(records: list[dict]) -> pd.DataFrame:
    """One row per completed trial: config columns, benchmark values, and the derived
    metrics with their 95% intervals (columns NAME, NAME_lo, NAME_hi)."""
    done = completed(records)
    if not done:
        return pd.DataFrame()
    tasks, dense = task_order(done), dense_baselines(done)
    above = {key: dense_above_chance(d, d["config"]["eval"]["tasks"]) for key, d in dense.items()}  # once each
    frame = pd.DataFrame(
        [_row(r, tasks) | _derived(r, dense.get(eval_key(r)), tasks, above.get(eval_key(r))) for r in done]
    )
    return frame.sort_values(
        ["model", "is_dense", "n_experts", "n_routers", "top_k", "router_mode", "partition", "budget", "seed"],
        ascending=[True, False, True, True, True, True, True, True, True],
        na_position="first",
    ).reset_index(drop=True)


def _row(record: dict, tasks: list[str]) -> dict:
    cfg, factor = record["config"], record["config"].get("factor") or {}
    metrics = record.get("metrics") or {}
    row = {
        "trial_id": record["trial_id"],
        "model": cfg["model"],
        "setting": record["setting"],
        "is_dense": not factor,
        "n_experts": factor.get("n_experts"),
        "top_k": factor.get("top_k"),
        "n_routers": factor.get("n_routers"),
        "router_mode": factor.get("router_mode", "-"),
        "partition": factor.get("partition", "-"),
        "seed": cfg.get("seed"),
        "n_shared": factor.get("n_shared", 0) if factor else math.nan,
        "active_pct": active_pct(record),
        "recipe": (record["recipe"] or "paper") if factor else "-",
        "budget": cfg["train"]["data_budget_tokens"] if factor else math.nan,
        "calibration_tokens": cfg["train"].get("calibration_tokens", 0) if factor else math.nan,
        "eval_key": eval_key(record),
        "tasks": tuple(cfg["eval"]["tasks"]),
        "pretraining_tokens": _number((record.get("model") or {}).get("pretraining_tokens")),
    }
    for name in tasks:
        m = metrics.get(name)
        row[name] = m["value"] if m else math.nan
        row[f"{name}_stderr"] = _number(m and m.get("stderr"))
        row[f"{name}_metric"] = m["metric"] if m else None
        row[f"{name}_chance"] = _number(m and m.get("chance"))
        row[f"{name}_n"] = m["n"] if m else math.nan
    flops = record.get("flops") or {}
    for part in ("attention", "ffn", "total"):
        row[f"{part}_gflops"] = flops.get(f"{part}_gflops_per_token", math.nan)
    row["attention_share"] = row["attention_gflops"] / row["total_gflops"]
    row["head_share"] = flops.get("lm_head_gflops_per_token", math.nan) / row["total_gflops"]
    dense_flops = (record.get("dense_reference") or {}).get("flops") or {}
    row["dense_attention_share"] = (
        dense_flops["attention_gflops_per_token"] / dense_flops["total_gflops_per_token"] if dense_flops else math.nan
    )
    # speed against dense, eager (speedup) and served by an engine (served), medians and round ranges
    for prefix, speed in (("", record.get("speedup") or {}), ("served_", record.get("served") or {})):
        for phase in ("prefill", "decode"):
            rounds = speed.get(f"{phase}_rounds") or []
            row[f"{prefix}{phase}_speedup"] = speed.get(phase, math.nan)
            row[f"{prefix}{phase}_speedup_min"] = min(rounds) if rounds else math.nan
            row[f"{prefix}{phase}_speedup_max"] = max(rounds) if rounds else math.nan
    row["served_error"] = (record.get("served") or {}).get("error", "")
    summary = (record.get("routing") or {}).get("summary") or {}
    for key in ("expert_similarity", "router_agreement", "load_max_over_mean", "routing_entropy_normalized"):
        row[key] = _number(summary.get(key))
    row["expert_similarity_at_factorization"] = _number(
        (record.get("routing_at_factorization") or {}).get("expert_similarity")
    )
    row["chance_agreement"] = factor["top_k"] / factor["n_experts"] if factor else math.nan
    row.update(_churn_columns(((record.get("training") or {}).get("churn") or {}).get("series")))
    return row


def _number(value) -> float:
    return math.nan if value is None or value is False else float(value)


def _churn_columns(series: list | None) -> dict:
    """Mean churn over the first and the last third of the measurements."""
    values = [c for _, c in series or []]
    if len(values) < 3:
        return {"churn_early": math.nan, "churn_late": math.nan}
    third = max(1, len(values) // 3)
    return {"churn_early": float(np.mean(values[:third])), "churn_late": float(np.mean(values[-third:]))}


def _columns(prefix: str, estimate: Estimate) -> dict:
    return {prefix: estimate.value, f"{prefix}_lo": estimate.low, f"{prefix}_hi": estimate.high}


def _derived(
    record: dict, dense: dict | None, tasks: list[str], dense_chance: tuple[list[str], list[str]] | None
) -> dict:
    """`dense_chance`: dense_above_chance of the baseline, computed once per baseline."""
    configured = record["config"]["eval"]["tasks"]
    out = _columns("average", _average(record, configured))
    held = record.get("heldout") or {}
    out |= _columns("heldout_loss", stats.mean_ci(held.get("per_sequence_loss") or []))
    out |= _columns("kl_from_dense", stats.mean_ci(held.get("per_sequence_kl") or []))
    out |= _no_comparison(tasks)
    if dense is None:
        return out
    paired = aligned([record, dense], configured)
    out |= _columns("maintenance_pct", stats.paired_ci(stats.maintenance, paired) if paired else Estimate.missing())
    included, at_chance = dense_chance  # same eval key, so the same task list
    out["cn_benchmarks"], out["dense_at_chance"] = ",".join(included), ",".join(at_chance)
    if paired and included:
        chance = {b: dense["metrics"][b]["chance"] for b in included}
        out |= _columns(
            "cn_maintenance_pct", stats.paired_ci(stats.chance_normalized(chance), {b: paired[b] for b in included})
        )
    out |= _columns("delta_loss_vs_dense", paired_sequences([record, dense], "per_sequence_loss"))
    for name in configured:
        v, d = (record.get("metrics") or {}).get(name), (dense.get("metrics") or {}).get(name)
        out[f"{name}_maintenance_pct"] = 100 * v["value"] / d["value"] if v and d and d["value"] else math.nan
    variant_flops, dense_flops = record.get("flops") or {}, dense.get("flops") or {}
    if variant_flops and dense_flops:
        for part in ("ffn", "total"):
            key = f"{part}_gflops_per_token"
            out[f"{part}_reduction_pct"] = 100 * (1 - variant_flops[key] / dense_flops[key])
    return out


def _no_comparison(tasks: list[str]) -> dict:
    """The columns a comparison with the dense baseline fills, all missing."""
    out = {"cn_benchmarks": "", "dense_at_chance": "", "ffn_reduction_pct": math.nan, "total_reduction_pct": math.nan}
    for name in ("maintenance_pct", "cn_maintenance_pct", "delta_loss_vs_dense"):
        out |= _columns(name, Estimate.missing())
    return out | {f"{n}_maintenance_pct": math.nan for n in tasks}


def _average(record: dict, tasks: list[str]) -> Estimate:
    """The benchmark average with its interval (items resampled per benchmark)."""
    metrics = record.get("metrics") or {}
    if any(name not in metrics for name in tasks):
        return Estimate.missing()
    items = {n: metrics[n].get("items") for n in tasks}
    if any(i is None for i in items.values()):  # records without per-item outcomes: the point value only
        return Estimate(float(np.mean([metrics[n]["value"] for n in tasks])), math.nan, math.nan)
    columns = {n: np.asarray(i["correct"], dtype=float)[:, None] for n, i in items.items()}
    return stats.paired_ci(lambda means: np.mean([m[..., 0] for m in means.values()], axis=0), columns)


def aligned(records: list[dict], tasks: list[str]) -> dict[str, np.ndarray] | None:
    """benchmark -> (items, len(records)) correct/incorrect of each record on the same
    items; None unless every record has every benchmark on identical item ids."""
    out = {}
    for name in tasks:
        items = [((r.get("metrics") or {}).get(name) or {}).get("items") for r in records]
        if any(i is None for i in items) or any(i["id"] != items[0]["id"] for i in items[1:]):
            return None
        out[name] = np.column_stack([np.asarray(i["correct"], dtype=float) for i in items])
    return out


def paired_sequences(records: list[dict], key: str) -> Estimate:
    """Mean over held-out sequences of first record's value minus the second's."""
    values = [np.asarray((r.get("heldout") or {}).get(key) or [], dtype=float) for r in records]
    if len(values[0]) < 2 or values[0].shape != values[1].shape:
        return Estimate.missing()
    return stats.mean_ci(values[0] - values[1])


def dense_above_chance(dense: dict, tasks: list[str]) -> tuple[list[str], list[str]]:
    """(benchmarks where the dense model's 95% interval lies above chance, the others)."""
    above, at_chance = [], []
    for name in tasks:
        m = (dense.get("metrics") or {}).get(name) or {}  # none with eval.benchmarks: false
        if m.get("items") is None or m.get("chance") is None:
            at_chance.append(name)
            continue
        accuracy = stats.mean_ci(m["items"]["correct"])
        (above if accuracy.low > m["chance"] else at_chance).append(name)
    return above, at_chance


# a − b for maintenance (points), held-out loss and KL, each with its 95% interval, and the verdict
DIFFERENCE_COLUMNS = [f"{m}_diff{s}" for m in ("maintenance", "loss", "kl") for s in ("", "_lo", "_hi")] + ["verdict"]


def pair_differences(records: list[dict]) -> pd.DataFrame:
    """Every pair of factorized trials (same model and evaluation) that differ in one
    factor: differences in maintenance (points of %), held-out loss and KL, paired over
    items and sequences, with 95% intervals; `verdict` says which exclude zero."""
    done = [r for r in completed(records) if r["config"].get("factor")]
    dense, rows = dense_baselines(records), []
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            if eval_key(a) != eval_key(b):
                continue
            differ = differing_factors(a, b)
            if differ is None or len(differ) != 1:
                continue
            rows.append(_pair_row(a, b, differ[0], a["factors"], b["factors"], dense.get(eval_key(a))))
    return pd.DataFrame(rows, columns=["model", "factor", "a", "b", *DIFFERENCE_COLUMNS])


def differing_factors(a: dict, b: dict) -> list[str] | None:
    """The factors in which two records differ, over the union of their factor names: a factor one
    record lacks (written before the option existed) takes its declared default, from whichever
    record carries `factor_defaults`; None when that is unknown (the pair cannot be compared)."""
    va, vb = a["factors"], b["factors"]
    defaults = (a.get("factor_defaults") or {}) | (b.get("factor_defaults") or {})
    differ = []
    for key in sorted(set(va) | set(vb)):
        if (key not in va or key not in vb) and key not in defaults:
            return None
        x, y = va.get(key, defaults.get(key)), vb.get(key, defaults.get(key))
        if key == OTHER_TRAINING:  # JSON of the remaining settings: compare those both records name
            x, y = json.loads(x), json.loads(y)
            x, y = ({k: v[k] for k in set(x) & set(y)} for v in (x, y))
        if x != y:
            differ.append(key)
    return differ


OTHER_TRAINING = "other training settings"  # harness/config.py TrialConfig.factors()


def _pair_row(a: dict, b: dict, factor: str, va: dict, vb: dict, dense: dict | None) -> dict:
    tasks = a["config"]["eval"]["tasks"]
    paired = aligned([a, b, dense], tasks) if dense else None
    maint = stats.paired_ci(stats.maintenance_difference, paired) if paired else Estimate.missing()
    loss = paired_sequences([a, b], "per_sequence_loss")
    kl = paired_sequences([a, b], "per_sequence_kl")
    row = {"model": a["config"]["model"], "factor": factor, "a": a["variant"], "b": b["variant"]}
    row |= _columns("maintenance_diff", maint) | _columns("loss_diff", loss) | _columns("kl_diff", kl)
    words = []
    for name, estimate in (("maintenance", maint), ("held-out loss", loss), ("KL", kl)):
        if estimate.ok:
            words.append(f"{name} {'differs' if estimate.excludes(0) else 'not distinguishable'}")
    row["verdict"] = "; ".join(words) or "n/a"
    return row


def recipe_comparison(records: list[dict]) -> pd.DataFrame:
    """Every conversion recipe against the paper's at the same model, evaluation, active
    FFN width, data budget (calibration included), router mode, router count and seed: paired
    differences of maintenance, held-out loss and KL (recipe minus paper) with 95%
    intervals. The paper's recipe: contiguous split, `scaled`, random router init,
    `min_mse`, no shared experts, no calibration, no distillation."""
    done = [r for r in completed(records) if r["config"].get("factor")]
    dense, rows = dense_baselines(records), []

    def key(r: dict) -> tuple:
        cfg = r["config"]
        return (
            cfg["model"],
            eval_key(r),
            round(active_pct(r), 6),
            cfg["train"]["data_budget_tokens"],
            cfg["factor"]["router_mode"],
            cfg["factor"]["n_routers"],
            cfg["seed"],
        )

    papers = {key(r): r for r in done if r["paper_recipe"]}
    for r in done:
        paper = papers.get(key(r))
        if paper is None or r is paper:
            continue
        rows.append(_pair_row(r, paper, "recipe", {}, {}, dense.get(eval_key(r))) | {"active_pct": key(r)[2]})
    columns = ["model", "active_pct", "a", "b", *DIFFERENCE_COLUMNS]
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "active_pct", "loss_diff"]).reset_index(drop=True)


def pareto_front(frame: pd.DataFrame, cost: str = "ffn_gflops", value: str = "maintenance_pct") -> pd.Series:
    """True where no other trial is at least as cheap and as good, and strictly better in one
    (point values: the intervals say how firm each point is)."""
    points = frame[[cost, value]].to_numpy(dtype=float)
    flags = []
    for c, v in points:
        if math.isnan(c) or math.isnan(v):
            flags.append(False)
            continue
        dominated = any(
            (c2 <= c and v2 >= v) and (c2 < c or v2 > v) for c2, v2 in points if not (math.isnan(c2) or math.isnan(v2))
        )
        flags.append(not dominated)
    return pd.Series(flags, index=frame.index)


def random_router_similarity(frame: pd.DataFrame, row) -> float:
    """Expert similarity of the sweep's random/frozen-router trials with the same experts
    (N, K, partition, budget; the router count does not matter to an untrained router)."""
    same = frame[
        (frame["eval_key"] == row["eval_key"])
        & (frame["n_experts"] == row["n_experts"])
        & (frame["top_k"] == row["top_k"])
        & (frame["partition"] == row["partition"])
        & (frame["budget"] == row["budget"])
        & frame["router_mode"].isin(["random", "frozen"])
    ]
    return float(same["expert_similarity"].mean()) if len(same) else math.nan


def failure_flags(row, frame: pd.DataFrame | None = None, name: str | None = None) -> list[str]:
    """Plain-words flags for the failure modes a variant row crosses (THRESHOLDS); `name` names the
    variant in them (default: its setting and router mode)."""
    flags, name = [], name or f"{row['setting']} {row['router_mode']}"
    if row["n_routers"] and row["n_routers"] > 1 and not math.isnan(row["router_agreement"]):
        chance = row["chance_agreement"]
        excess = (row["router_agreement"] - chance) / (1 - chance) if chance < 1 else math.nan
        if excess < threshold("router_conflict_excess_agreement"):
            flags.append(
                f"router conflict: {name} routers agree on {100 * row['router_agreement']:.0f}% of top-K "
                f"choices (chance {100 * chance:.0f}%, {excess:.2f} of the way from chance to full)"
            )
    rise = row["expert_similarity"] - row["expert_similarity_at_factorization"]
    baseline = random_router_similarity(frame, row) if frame is not None else math.nan
    if rise > threshold("expert_collapse_rise") and (math.isnan(baseline) or row["expert_similarity"] > baseline):
        flags.append(
            f"expert collapse: {name} experts' mean cosine similarity rose from "
            f"{row['expert_similarity_at_factorization']:.2f} at factorization to {row['expert_similarity']:.2f}"
            + ("" if math.isnan(baseline) else f" (random/frozen router: {baseline:.2f})")
        )
    if row["load_max_over_mean"] > threshold("load_imbalance_max_over_mean"):
        flags.append(f"load imbalance: {name} busiest expert gets {row['load_max_over_mean']:.1f}x the mean load")
    if row["attention_share"] > threshold("attention_share") and row["attention_share"] - row[
        "dense_attention_share"
    ] >= threshold("attention_share_rise"):
        flags.append(
            f"attention bottleneck: attention is {100 * row['attention_share']:.0f}% of {name}'s FLOPs per "
            f"token (dense: {100 * row['dense_attention_share']:.0f}% at the same length)"
        )
    if row["total_reduction_pct"] >= 100 * threshold("no_speed_gain_flops_saved") and row["prefill_speedup_max"] <= 1:
        flags.append(
            f"no speed gained: {name} saves {row['total_reduction_pct']:.0f}% of total FLOPs but no "
            f"round ran faster than dense (prefill x{row['prefill_speedup_min']:.2f}-"
            f"{row['prefill_speedup_max']:.2f})"
        )
    if row["churn_late"] > threshold("late_churn"):
        flags.append(
            f"routing unstable late in training: {name} churn {row['churn_late']:.2f} over the last third "
            f"(first third: {row['churn_early']:.2f})"
        )
    return flags


def data_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    variants = frame[~frame["is_dense"]].copy()
    variants["budget_pct_of_pretraining"] = 100 * variants["budget"] / variants["pretraining_tokens"]
    return variants[
        [
            "model",
            "setting",
            "router_mode",
            "partition",
            "budget",
            "pretraining_tokens",
            "budget_pct_of_pretraining",
            "maintenance_pct",
            "heldout_loss",
        ]
    ].sort_values(["model", "setting", "budget"])


def router_study(frame: pd.DataFrame) -> pd.DataFrame:
    variants = frame[~frame["is_dense"]]
    if variants.empty:
        return pd.DataFrame()
    return variants.pivot_table(
        index=["model", "setting", "partition", "budget"],
        columns="router_mode",
        values="maintenance_pct",
        aggfunc="mean",
    ).reset_index()


def failed_trials(records: list[dict], expected: list[dict] | None = None) -> pd.DataFrame:
    rows = [
        {"trial_id": r["trial_id"], "label": r["label"], "status": r["status"], "reason": r.get("error") or ""}
        for r in records
        if r.get("status") not in ("completed", "stopped")  # stopped trials have their own table
    ]
    seen = {r["trial_id"] for r in records}
    for trial in expected or []:  # TrialConfig.describe() of every trial the sweep expected
        if trial["trial_id"] not in seen:
            rows.append(
                {
                    "trial_id": trial["trial_id"],
                    "label": trial["label"],
                    "status": "missing",
                    "reason": "no record (not run yet, or interrupted)",
                }
            )
    return pd.DataFrame(rows, columns=["trial_id", "label", "status", "reason"])


def last_heldout_slice_loss(record: dict) -> float:
    """The last held-out slice loss of a trial's training series (what a scheduler compared)."""
    points = [p for p in (record.get("training") or {}).get("series") or [] if p.get("heldout_loss") is not None]
    return points[-1]["heldout_loss"] if points else math.nan


def early_stopping(records: list[dict]) -> tuple[pd.DataFrame, dict] | None:
    """Trials stopped early by a scheduler, and what the sweep spent: training tokens of the
    factorized trials (a stopped trial's tokens, a completed one's) against what the full
    grid would have spent (every one of them to its budget). None when nothing was stopped."""
    stopped = [r for r in records if r.get("status") == "stopped"]
    if not stopped:
        return None
    rows = [
        {
            "trial_id": r["trial_id"],
            "label": r["label"],
            "tokens used": r["stopped"]["tokens"],
            "budget": r["config"]["train"]["data_budget_tokens"],
            "last held-out slice loss": r["stopped"]["last"].get("heldout_loss", math.nan),
        }
        for r in stopped
    ]
    factorized = [r for r in records if r["config"].get("factor") and r.get("status") in ("completed", "stopped")]
    spent = sum(
        r["stopped"]["tokens"] if r["status"] == "stopped" else (r.get("training") or {}).get("tokens", 0)
        for r in factorized
    )
    full = sum(
        r["config"]["train"]["data_budget_tokens"] - r["config"]["train"]["calibration_tokens"] for r in factorized
    )
    done = [r for r in factorized if r["status"] == "completed" and r.get("heldout")]
    best = min(done, key=lambda r: r["heldout"]["loss"]) if done else None
    summary = {"spent": spent, "full": full, "stopped": len(stopped), "best": best}
    return pd.DataFrame(rows), summary
