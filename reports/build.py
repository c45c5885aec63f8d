"""Build the sweep report from stored records alone.

    python -m reports.build runs/sweeps/default            # records + shared baselines
    python -m reports.build runs/sweeps/default --out some/folder

Writes report.md (tables + embedded PNGs), trials.csv (every number, with
per-benchmark maintenance) and the plots.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pandas as pd

from harness.benchmarks import TASK_SET

from . import plots
from .tables import (DIRECTIONS, THRESHOLDS, data_efficiency, failed_trials, failure_flags, load_records,
                     pareto_front, router_study, trial_frame)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_stderr(row, name) -> str:
    if math.isnan(row[name]):
        return "n/a"
    stderr = row[f"{name}_stderr"]
    return f"{row[name]:.3f}" + ("" if math.isnan(stderr) else f" ±{stderr:.3f}")


def main_table(frame: pd.DataFrame, model: str) -> str:
    rows = frame[frame["model"] == model]
    tasks = [n for n in TASK_SET if rows[n].notna().any() or any(n in t for t in rows["tasks"])]
    metric_names = {n: next((m for m in rows[f"{n}_metric"] if m), "?") for n in tasks}
    header = (["variant", "mode", "partition", "budget"] + [f"{n} ({metric_names[n]})" for n in tasks]
              + ["avg", "maint. %", "attn GF", "FFN GF", "total GF", "FFN red. %", "total red. %", "prefill x"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in rows.iterrows():
        cells = [r["setting"], r["router_mode"], r["partition"], fmt(r["budget"], 0)]
        cells += [_with_stderr(r, n) for n in tasks]
        cells += [fmt(r.get("average")), fmt(r.get("maintenance_pct"), 1), fmt(r["attention_gflops"], 4),
                  fmt(r["ffn_gflops"], 4), fmt(r["total_gflops"], 4), fmt(r.get("ffn_reduction_pct"), 1),
                  fmt(r.get("total_reduction_pct"), 1), fmt(r.get("prefill_speedup"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


INTEGER_COLUMNS = ("n_experts", "n_routers", "top_k", "budget", "seed")


def _markdown(frame: pd.DataFrame) -> str:
    """pandas -> markdown; NaN shows as n/a, counts as integers, other numbers with 3 decimals."""
    if frame.empty:
        return "_none_"
    def cell(value, column):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if column in INTEGER_COLUMNS:
            return str(int(value))
        if isinstance(value, float) and value != 0 and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}"
        return fmt(value)

    shown = pd.DataFrame({c: [cell(v, c) for v in frame[c]] for c in frame.columns})
    return shown.to_markdown(index=False, disable_numparse=True)  # keep our formatting


def scaling_table(frame: pd.DataFrame) -> str:
    variants = frame[~frame["is_dense"]].copy()
    if variants.empty:
        return "_no factorized trials_"
    variants["K/N"] = variants["top_k"] / variants["n_experts"]
    columns = ["model", "setting", "router_mode", "n_experts", "n_routers", "K/N", "maintenance_pct",
               "expert_similarity", "router_agreement", "load_max_over_mean", "routing_entropy_normalized",
               "attention_share"]
    return _markdown(variants[columns])


def build_report(records: list[dict], out_dir: str | Path, expected: list[dict] | None = None,
                 title: str = "FactorLLM sweep", skipped: list[dict] | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trial_frame(records)
    sections = [f"# {title}", ""]
    if frame.empty:
        sections += ["No completed trials yet.", ""]
    else:
        frame["pareto"] = pareto_front(frame)
        frame.drop(columns=["eval_key", "tasks"]).to_csv(out_dir / "trials.csv", index=False)
        sections += _body(frame, records, out_dir)
    sections += ["## Failed and missing trials", "", _markdown(failed_trials(records, expected)), ""]
    if skipped:
        sections += ["## Skipped combinations", ""] + [f"- {s['label']}: {s['reason']}" for s in skipped] + [""]
    path = out_dir / "report.md"
    tmp = path.with_name(f".report.md.tmp-{os.getpid()}")
    tmp.write_text("\n".join(sections))
    os.replace(tmp, path)
    return path


def _body(frame: pd.DataFrame, records: list[dict], out_dir: Path) -> list[str]:
    lines = [_setup_note(records), ""]
    for model in frame["model"].unique():
        lines += [f"## Main table: {model}", "", main_table(frame, model), ""]
    lines += ["GF = GFLOPs per token counted by fvcore (1 FLOP = 1 multiply-add) on a fixed real text; "
              "maint. % = benchmark average as % of the dense model's; prefill x = measured prefill "
              "throughput vs dense on the trial's device. Per-benchmark maintenance is in trials.csv.", ""]
    lines += ["## Router study (relative maintenance %, by router mode)", "", _markdown(router_study(frame)), "",
              "The paper reports a trained router keeping 85.6% vs 73.9% for random expert selection "
              "(TinyLlama, 1R4E2K).", ""]
    lines += ["## Data efficiency", "", _markdown(data_efficiency(frame)), ""]
    lines += ["## Scaling and failure modes", "", scaling_table(frame), ""]
    flags = [f for _, row in frame[~frame["is_dense"]].iterrows() for f in failure_flags(row)]
    lines += ["Thresholds: " + ", ".join(f"{k} {v}" for k, v in THRESHOLDS.items()) + ".", ""]
    lines += [f"- {f}" for f in flags] or ["- no failure mode crossed its threshold"]
    lines += ["", "Better direction per metric: " + ", ".join(f"{k} {v}" for k, v in DIRECTIONS.items()), ""]
    lines += ["## Plots", ""] + _plots(frame, records, out_dir)
    return lines


def _setup_note(records: list[dict]) -> str:
    done = [r for r in records if r.get("status") == "completed"]
    if not done:
        return ""
    ev = done[0]["config"]["eval"]
    budgets = sorted({r["config"]["train"]["data_budget_tokens"] for r in done if r["config"].get("factor")})
    devices = sorted({r.get("environment", {}).get("device", "?") for r in done})
    return (f"Evaluation: lm-eval, {ev['num_fewshot']}-shot, source {ev['source']}, "
            f"limit {ev['limit'] if ev['limit'] else 'none (full sets)'} per benchmark; training budgets "
            f"{budgets} tokens; devices {devices}. Maintenance is computed on raw accuracies, as in the "
            f"paper: chance levels (25% for 4-way tasks, 50% for BoolQ, PIQA, Winogrande) put a floor under "
            f"it, and with few rows per benchmark differences within the stderr are noise.")


def _plots(frame: pd.DataFrame, records: list[dict], out_dir: Path) -> list[str]:
    lines = []
    for name, made in (("maintenance_vs_ffn_flops.png", plots.maintenance_vs_flops(frame, out_dir / "maintenance_vs_ffn_flops.png")),
                       ("maintenance_vs_budget.png", plots.maintenance_vs_budget(frame, out_dir / "maintenance_vs_budget.png"))):
        if made:
            lines += [f"![{name}]({name})", ""]
    factored = [r for r in records if r.get("status") == "completed" and (r.get("routing") or {}).get("layers")]
    if factored:  # the trial whose load is least balanced is the most informative heat map
        chosen = max(factored, key=lambda r: r["routing"]["summary"]["load_max_over_mean"])
        if plots.expert_load_heatmap(chosen, out_dir / "expert_load.png"):
            lines += [f"Per-layer expert load of {chosen['trial_id']} ({chosen['label']}):", "",
                      "![expert_load.png](expert_load.png)", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a sweep folder (<storage>/<name>) holding records/")
    parser.add_argument("--out", default=None, help="default: <sweep_dir>/report")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    records = load_records(sweep_dir / "records")
    models = {r["config"]["model"] for r in records}
    baselines = [r for r in load_records(sweep_dir.parent / "baselines") if r["config"]["model"] in models]
    path = build_report(baselines + records, args.out or sweep_dir / "report", title=f"Sweep {sweep_dir.name}")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
