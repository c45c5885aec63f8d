"""Records -> pandas DataFrames. Pure functions; no model, no Ray.

Relative maintenance = a variant's benchmark average / its dense baseline's
average x 100, with the baseline matched on model and evaluation settings. An
average exists only when every benchmark of the task set is present: a missing
metric stays missing (NaN, shown as "n/a"), never a default number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from harness.benchmarks import TASK_SET
from harness.models import pretraining_tokens

# Each report metric's better direction, in one place.
DIRECTIONS = {"average": "higher", "maintenance_pct": "higher", "ffn_gflops": "lower", "total_gflops": "lower",
              "attention_gflops": "lower", "ffn_reduction_pct": "higher", "total_reduction_pct": "higher",
              "prefill_speedup": "higher", "decode_speedup": "higher", "expert_similarity": "lower",
              "router_agreement": "higher", "load_max_over_mean": "lower", "routing_entropy_normalized": "higher",
              "attention_share": "lower"}

# Failure-mode thresholds (documented in the report itself).
THRESHOLDS = {"router_conflict_agreement": 0.5,  # R > 1 routers agreeing on fewer top-K choices
              "expert_collapse_similarity": 0.9,  # mean pairwise cosine similarity of expert outputs
              "load_imbalance_max_over_mean": 2.0,  # busiest expert vs the mean load
              "attention_bottleneck_share": 0.5}  # attention's share of total FLOPs per token


def load_records(folder: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("**/record.json"))]


def _eval_key(record: dict) -> tuple:
    cfg = record["config"]
    ev = cfg["eval"]
    return (cfg["model"], tuple(ev["tasks"]), ev["limit"], ev["num_fewshot"], ev["source"])


def _setting(cfg: dict) -> str:
    f = cfg.get("factor")
    return "dense" if f is None else f"{f['n_routers']}R{f['n_experts']}E{f['top_k']}K"


def trial_frame(records: list[dict]) -> pd.DataFrame:
    """One row per completed trial: config columns, benchmark values, derived metrics."""
    done = [r for r in records if r.get("status") == "completed"]
    rows = [_row(r) for r in done]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    dense = {row["eval_key"]: row for row in rows if row["setting"] == "dense"}
    derived = ["average", "attention_share", "maintenance_pct", "ffn_reduction_pct", "total_reduction_pct"]
    for column in derived + [f"{n}_maintenance_pct" for n in TASK_SET]:
        frame[column] = math.nan
    for i, row in frame.iterrows():
        _derive(frame, i, row, dense.get(row["eval_key"]))
    return frame.sort_values(["model", "is_dense", "n_experts", "n_routers", "top_k", "router_mode",
                              "partition", "budget", "seed"], ascending=[True, False, True, True, True,
                                                                          True, True, True, True],
                             na_position="first").reset_index(drop=True)


def _row(record: dict) -> dict:
    cfg, factor = record["config"], record["config"].get("factor") or {}
    metrics = record.get("metrics", {})
    row = {"trial_id": record["trial_id"], "model": cfg["model"], "setting": _setting(cfg),
           "is_dense": not factor, "n_experts": factor.get("n_experts"), "top_k": factor.get("top_k"),
           "n_routers": factor.get("n_routers"), "router_mode": factor.get("router_mode", "-"),
           "partition": factor.get("partition", "-"), "seed": cfg.get("seed"),
           "budget": cfg["train"]["data_budget_tokens"] if factor else math.nan, "eval_key": _eval_key(record),
           "tasks": tuple(cfg["eval"]["tasks"])}
    for name in TASK_SET:
        m = metrics.get(name)
        row[name] = m["value"] if m else math.nan
        row[f"{name}_stderr"] = m["stderr"] if m and m["stderr"] is not None else math.nan
        row[f"{name}_metric"] = m["metric"] if m else None
    flops = record.get("flops") or {}
    for part in ("attention", "ffn", "total"):
        row[f"{part}_gflops"] = flops.get(f"{part}_gflops_per_token", math.nan)
    speed = record.get("speedup") or {}
    row["prefill_speedup"], row["decode_speedup"] = speed.get("prefill", math.nan), speed.get("decode", math.nan)
    summary = (record.get("routing") or {}).get("summary") or {}
    for key in ("expert_similarity", "router_agreement", "load_max_over_mean", "routing_entropy_normalized"):
        value = summary.get(key)
        row[key] = math.nan if value is None else value
    return row


def _derive(frame: pd.DataFrame, i, row, dense) -> None:
    # the average is over the benchmarks the trial was configured with, and only when all are present
    values = [row[n] for n in row["tasks"]]
    frame.loc[i, "average"] = sum(values) / len(values) if not any(math.isnan(v) for v in values) else math.nan
    frame.loc[i, "attention_share"] = row["attention_gflops"] / row["total_gflops"]
    if dense is None:
        return
    dense_values = [dense[n] for n in row["tasks"]]
    if not any(math.isnan(v) for v in dense_values + values) and sum(dense_values) > 0:
        frame.loc[i, "maintenance_pct"] = 100 * sum(values) / sum(dense_values)
    for name in row["tasks"]:
        frame.loc[i, f"{name}_maintenance_pct"] = 100 * row[name] / dense[name] if dense[name] else math.nan
    frame.loc[i, "ffn_reduction_pct"] = 100 * (1 - row["ffn_gflops"] / dense["ffn_gflops"])
    frame.loc[i, "total_reduction_pct"] = 100 * (1 - row["total_gflops"] / dense["total_gflops"])


def pareto_front(frame: pd.DataFrame, cost: str = "ffn_gflops", value: str = "maintenance_pct") -> pd.Series:
    """True where no other trial is at least as cheap and as good, and strictly better in one."""
    points = frame[[cost, value]].to_numpy()
    flags = []
    for c, v in points:
        if math.isnan(c) or math.isnan(v):
            flags.append(False)
            continue
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for c2, v2 in points
                        if not (math.isnan(c2) or math.isnan(v2)))
        flags.append(not dominated)
    return pd.Series(flags, index=frame.index)


def failure_flags(row) -> list[str]:
    """Plain-words flags for the scaling failure modes a row crosses."""
    flags, t = [], THRESHOLDS
    name = f"{row['setting']} {row['router_mode']}"
    if row["n_routers"] and row["n_routers"] > 1 and row["router_agreement"] < t["router_conflict_agreement"]:
        flags.append(f"router conflict: {name} routers agree on {100 * row['router_agreement']:.0f}% of top-K choices")
    if row["expert_similarity"] > t["expert_collapse_similarity"]:
        flags.append(f"expert collapse: {name} experts' outputs have mean cosine similarity "
                     f"{row['expert_similarity']:.2f}")
    if row["load_max_over_mean"] > t["load_imbalance_max_over_mean"]:
        flags.append(f"load imbalance: {name} busiest expert gets {row['load_max_over_mean']:.1f}x the mean load")
    if row["attention_share"] > t["attention_bottleneck_share"]:
        flags.append(f"attention bottleneck: attention is {100 * row['attention_share']:.0f}% of {name}'s FLOPs "
                     f"per token")
    return flags


def data_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    variants = frame[~frame["is_dense"]].copy()
    variants["pretraining_tokens"] = variants["model"].map(lambda m: pretraining_tokens(m) or math.nan).astype(float)
    variants["budget_pct_of_pretraining"] = 100 * variants["budget"] / variants["pretraining_tokens"]
    return variants[["model", "setting", "router_mode", "partition", "budget", "pretraining_tokens",
                     "budget_pct_of_pretraining", "maintenance_pct"]].sort_values(["model", "setting", "budget"])


def router_study(frame: pd.DataFrame) -> pd.DataFrame:
    variants = frame[~frame["is_dense"]]
    if variants.empty:
        return pd.DataFrame()
    return variants.pivot_table(index=["model", "setting", "partition", "budget"], columns="router_mode",
                                values="maintenance_pct", aggfunc="mean").reset_index()


def failed_trials(records: list[dict], expected: list[dict] | None = None) -> pd.DataFrame:
    rows = [{"trial_id": r["trial_id"], "label": r.get("label", ""), "status": r["status"],
             "reason": r.get("error") or ""} for r in records if r.get("status") != "completed"]
    seen = {r["trial_id"] for r in records}
    for cfg in expected or []:
        if cfg["trial_id"] not in seen:
            rows.append({"trial_id": cfg["trial_id"], "label": f"{cfg['model']} {_setting(cfg)}",
                         "status": "missing", "reason": "no record (not run yet, or interrupted)"})
    return pd.DataFrame(rows, columns=["trial_id", "label", "status", "reason"])
