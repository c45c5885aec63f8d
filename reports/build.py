"""Build the sweep report from stored records alone.

    python -m reports.build runs/sweeps/default            # the sweep's records, as its manifest lists them
    python -m reports.build runs/sweeps/default --out some/folder

Writes report.md (what the sweep shows, tables with 95% intervals, failure modes,
embedded PNGs), trials.csv (every number, with per-benchmark maintenance) and the plots.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import pandas as pd

from . import plots
from .findings import findings
from .record import (
    RECORD_FILE,
    load_records,
    output_problem,
    read_json_bounded,
    read_record,
    write_json_atomic,
    write_text_atomic,
)
from .scaling_section import scaling_section
from .stats import N_BOOT
from .tables import (
    DIRECTIONS,
    THRESHOLDS,
    completed,
    data_efficiency,
    early_stopping,
    eval_key,
    failed_trials,
    failure_flags,
    last_heldout_slice_loss,
    pair_differences,
    pareto_front,
    recipe_comparison,
    router_study,
    task_order,
    trial_frame,
)

log = logging.getLogger("reports.build")  # by name: this module also runs as __main__
MANIFEST = "sweep.json"  # written by the sweep: which records make its report


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_ci(row, name: str, digits: int) -> str:
    """'value [low, high]' from the columns NAME, NAME_lo, NAME_hi."""
    value, low, high = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
    if math.isnan(value):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return fmt(value, digits)
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _speed(row, name: str = "prefill_speedup") -> str:
    """A speedup's median and, when the rounds differ, their range."""
    if math.isnan(row[name]):
        return "n/a"
    low, high = row[f"{name}_min"], row[f"{name}_max"]
    if math.isnan(low) or low == high:
        return fmt(row[name], 2)
    return f"{row[name]:.2f} ({low:.2f}-{high:.2f})"


def main_table(frame: pd.DataFrame, model: str) -> str:
    rows = frame[frame["model"] == model]
    header = [
        "variant",
        "active FFN %",
        "mode",
        "partition",
        "recipe",
        "budget (calib.)",
        "held-out loss",
        "loss − dense",
        "KL(dense ‖ model)",
        "avg acc",
        "maint. %",
        "chance-norm. maint. %",
        "FFN GF",
        "total GF",
        "FFN red. %",
        "total red. %",
        "prefill x",
        "decode x",
    ]
    served = rows["served_prefill_speedup"].notna().any() or (rows["served_error"] != "").any()
    if served:  # latency.engine: llama.cpp
        header += ["served prefill x", "served decode x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in rows.iterrows():
        budget = fmt(r["budget"], 0) + (f" ({r['calibration_tokens']:.0f})" if r["calibration_tokens"] > 0 else "")
        cells = [
            r["setting"],
            fmt(r["active_pct"], 1),
            r["router_mode"],
            r["partition"],
            r["recipe"],
            budget,
            with_ci(r, "heldout_loss", 3),
            with_ci(r, "delta_loss_vs_dense", 3),
            with_ci(r, "kl_from_dense", 3),
            with_ci(r, "average", 3),
            with_ci(r, "maintenance_pct", 1),
            with_ci(r, "cn_maintenance_pct", 1),
            fmt(r["ffn_gflops"], 4),
            fmt(r["total_gflops"], 4),
            fmt(r["ffn_reduction_pct"], 1),
            fmt(r["total_reduction_pct"], 1),
            _speed(r),
            _speed(r, "decode_speedup"),
        ]
        if served:
            cells += [_speed(r, "served_prefill_speedup"), _speed(r, "served_decode_speedup")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def served_notes(frame: pd.DataFrame, model: str) -> list[str]:
    """Why a trial that asked for served speed has none (e.g. Gemma3: no stock MoE class)."""
    rows = frame[(frame["model"] == model) & (frame["served_error"] != "")]
    notes = [f"- {r['setting']} {r['recipe']}".rstrip() + f": {r['served_error']}" for _, r in rows.iterrows()]
    return ["No served speed (n/a above):", "", *notes, ""] if notes else []


def benchmark_table(frame: pd.DataFrame, model: str, tasks: list[str]) -> str:
    """Per-benchmark accuracy (lm-eval stderr) with each benchmark's chance level; † marks a
    benchmark on which the dense model is not above chance."""
    rows = frame[frame["model"] == model]
    dense = rows[rows["is_dense"]]
    at_chance = set(dense.iloc[0]["dense_at_chance"].split(",")) if len(dense) else set()
    header = ["variant", "mode"]
    for name in tasks:
        metric = next((m for m in rows[f"{name}_metric"] if m), "?")
        chance = rows[f"{name}_chance"].dropna()
        mark = " †" if name in at_chance else ""
        header.append(f"{name}{mark} ({metric}, chance {fmt(chance.iloc[0], 2) if len(chance) else 'n/a'})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in rows.iterrows():
        cells = [r["setting"], r["router_mode"]]
        for name in tasks:
            stderr = "" if math.isnan(r[f"{name}_stderr"]) else f" ±{r[f'{name}_stderr']:.3f}"
            cells.append("n/a" if math.isnan(r[name]) else f"{r[name]:.3f}{stderr}")
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[[f"{t}_n" for t in tasks]].max()
    lines += ["", "Items per benchmark: " + ", ".join(f"{t} {fmt(n[f'{t}_n'], 0)}" for t in tasks) + "."]
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


def pairs_table(pairs: pd.DataFrame) -> str:
    rows = [
        {"factor": p["factor"], "a": p["a"], "b": p["b"]} | _differences(p, MAINTENANCE_FIRST)
        for _, p in pairs.iterrows()
    ]
    return _markdown_rows(rows)


def recipes_table(recipes: pd.DataFrame) -> str:
    # recipes are compared by held-out loss first: at these sample sizes it resolves what accuracy cannot
    rows = [
        {"active FFN %": fmt(p["active_pct"], 1), "recipe (a)": p["a"], "paper (b)": p["b"]}
        | _differences(p, LOSS_FIRST)
        for _, p in recipes.iterrows()
    ]
    return _markdown_rows(rows)


DIFFERENCES = {
    "maintenance_diff": ("maint. a − b (points)", 1),
    "loss_diff": ("held-out loss a − b", 3),
    "kl_diff": ("KL a − b", 3),
}
MAINTENANCE_FIRST, LOSS_FIRST = (
    ("maintenance_diff", "loss_diff", "kl_diff"),
    ("loss_diff", "kl_diff", "maintenance_diff"),
)


def _differences(p, order: tuple[str, ...]) -> dict:
    """A pair's differences with their intervals, in `order`, and the verdict."""
    cells = {DIFFERENCES[name][0]: with_ci(p, name, DIFFERENCES[name][1]) for name in order}
    return cells | {"verdict (95% CI vs 0)": p["verdict"]}


def _markdown_rows(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def failure_table(frame: pd.DataFrame) -> str:
    variants = frame[~frame["is_dense"]].copy()
    if variants.empty:
        return "_no factorized trials_"
    columns = [
        "model",
        "setting",
        "router_mode",
        "n_routers",
        "router_agreement",
        "chance_agreement",
        "expert_similarity_at_factorization",
        "expert_similarity",
        "load_max_over_mean",
        "dense_attention_share",
        "attention_share",
        "total_reduction_pct",
        "prefill_speedup_min",
        "prefill_speedup_max",
        "churn_early",
        "churn_late",
    ]
    return _markdown(variants[columns])


def build_report(
    records: list[dict],
    out_dir: str | Path,
    expected: list[dict] | None = None,
    title: str = "FactorLLM sweep",
    skipped: list[dict] | None = None,
) -> Path:
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
    sections += _early_stopping(records)
    if plots.heldout_curves(records, out_dir / "heldout_during_training.png"):
        sections += [
            "## Held-out loss during training",
            "",
            "Loss on the held-out slice (train.heldout_slice_tokens of eval.heldout_text) against training "
            "tokens; dashed: stopped early by the scheduler.",
            "",
            "![heldout_during_training.png](heldout_during_training.png)",
            "",
        ]
    sections += ["## Failed and missing trials", "", _markdown(failed_trials(records, expected)), ""]
    if skipped:
        sections += ["## Skipped combinations", ""] + [f"- {s['label']}: {s['reason']}" for s in skipped] + [""]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(sections))
    return path


def _early_stopping(records: list[dict]) -> list[str]:
    found = early_stopping(records)
    if found is None:
        return []
    table, summary = found
    best = summary["best"]
    ranked = (
        f"Best completed trial by the full held-out loss: {best['trial_id']} ({best['label']}), "
        f"{best['heldout']['loss']:.4f} (its last held-out slice loss {last_heldout_slice_loss(best):.4f})."
        if best
        else "No factorized trial completed."
    )
    return [
        "## Stopped early",
        "",
        f"The scheduler stopped {summary['stopped']} trial(s). Training tokens spent by the factorized trials: "
        f"{summary['spent']:,} of the {summary['full']:,} the full grid would spend "
        f"({summary['spent'] / max(1, summary['full']):.0%}). {ranked} Stopped trials are never paired with "
        "completed ones nor counted as failed: their numbers are from a shorter training.",
        "",
        _markdown(table),
        "",
    ]


def _body(frame: pd.DataFrame, records: list[dict], out_dir: Path) -> list[str]:
    pairs = pair_differences(records)
    tasks = task_order(completed(records))
    lines = ["## What this sweep shows", ""] + [f"- {s}" for s in findings(frame, pairs)] + [""]
    lines += [_setup_note(records), ""]
    for model in frame["model"].unique():
        lines += [
            f"## Main table: {model}",
            "",
            main_table(frame, model),
            "",
            HOW_TO_READ,
            "",
        ]
        lines += served_notes(frame, model)
        if any(r.get("metrics") for r in completed(records)):  # none when eval.benchmarks is false
            lines += [f"### Per benchmark: {model}", "", benchmark_table(frame, model, tasks), ""]
    recipes = recipe_comparison(records)
    if not recipes.empty:
        lines += [
            "## Conversion recipes against the paper's (same active width, budget, router mode and count, seed)",
            "",
            recipes_table(recipes),
            "",
            "a − b: the recipe minus the paper's recipe, paired over items (maintenance) and held-out "
            "sequences (loss, KL); negative loss and KL differences are better. Calibration tokens come "
            "out of the same data budget.",
            "",
        ]
    lines += [
        "## Differences between trials that differ in one factor",
        "",
        pairs_table(pairs),
        "",
        "A difference is distinguishable from zero only when its 95% interval excludes 0; "
        "'not distinguishable' means this sample cannot tell the two apart, not that they are equal.",
        "",
    ]
    lines += [
        "## Router study (relative maintenance %, by router mode)",
        "",
        _markdown(router_study(frame)),
        "",
        "The paper reports a trained router keeping 85.6% vs 73.9% for random expert selection "
        "(TinyLlama, 1R4E2K, full benchmark sets). Point values here: see the main table for intervals.",
        "",
    ]
    lines += ["## Data efficiency", "", _markdown(data_efficiency(frame)), ""]
    lines += ["## Scaling and failure modes", "", failure_table(frame), ""]
    variants = frame[~frame["is_dense"]]
    flags = [f for _, row in variants.iterrows() for f in failure_flags(row, frame)]
    lines += [f"- {f}" for f in flags] or ["- no failure mode crossed its threshold"]
    lines += ["", "Thresholds, and why:", ""]
    lines += [
        f"- {name} = {value}: {reason}"
        for name, (value, reason) in THRESHOLDS.items()
        if name != "attention_share_rise"
    ]
    lines += ["", "Better direction per metric: " + ", ".join(f"{k} {v}" for k, v in DIRECTIONS.items()), ""]
    lines += scaling_section(frame, records, out_dir)
    lines += ["## Plots", ""] + _plots(frame, records, out_dir)
    return lines


HOW_TO_READ = (
    f"Brackets: 95% paired bootstrap intervals ({N_BOOT} replicates). Held-out loss: mean next-token loss (nats) on "
    "the held-out text, interval over its sequences; KL(dense ‖ model): mean next-token KL from the dense "
    "model's distribution on the same text (0 = unchanged). maint. % = benchmark average as % of the dense "
    "model's (items resampled jointly for both); chance-norm. maint. % = share of the dense model's "
    "above-chance accuracy kept, 100 x sum(acc - chance) / sum(dense - chance), over the benchmarks where the "
    "dense model is above chance (0 = guessing, 100 = dense). GF = GFLOPs per token counted by fvcore "
    "(1 FLOP = 1 multiply-add) on a fixed real text; prefill x, decode x = measured speed vs dense in eager "
    "PyTorch on the trial's device, median (and range) over interleaved rounds; served prefill x, served "
    "decode x (latency.engine: llama.cpp) = the same in llama.cpp, both models converted alike to f16 GGUF, "
    "where the model exports exactly (n/a otherwise, with the reason in the record's `served.error`). Eager "
    "timings of a small model are bound by per-operation overhead; served ones are what a deployment sees."
)


def _setup_note(records: list[dict]) -> str:
    done = completed(records)
    if not done:
        return ""
    ev = done[0]["config"]["eval"]
    budgets = sorted({r["config"]["train"]["data_budget_tokens"] for r in done if r["config"].get("factor")})
    devices = sorted({(r.get("environment") or {}).get("device", "?") for r in done})
    sample = (
        f"a random sample of {ev['limit']} items per benchmark (seed {ev.get('sample_seed', 0)}; MMLU "
        f"stratified over its subjects), the same items for every trial"
        if ev["limit"]
        else "the full sets"
    )
    heldout = (
        f"held-out text {ev['heldout_text']!r}, first {ev['heldout_tokens']} tokens in "
        f"{ev['heldout_seq_len']}-token sequences"
        if "heldout_text" in ev
        else "no held-out text"
    )
    if ev.get("heldout_documents"):
        heldout = (
            f"held-out text {ev['heldout_text']!r}, its first {ev['heldout_documents']} documents whole (the same "
            "text for every model)"
        )
    scoring = (
        f"lm-eval, {ev['num_fewshot']}-shot, source {ev['source']}, {sample}"
        if ev.get("benchmarks", True)
        else "benchmarks off (eval.benchmarks: false)"
    )
    return f"Setup: {scoring}; {heldout}; training budgets {budgets} tokens; devices {devices}."


def _plots(frame: pd.DataFrame, records: list[dict], out_dir: Path) -> list[str]:
    lines = []
    made = [
        ("maintenance_vs_ffn_flops.png", plots.maintenance_vs_flops),
        ("heldout_loss_vs_ffn_flops.png", plots.heldout_loss_vs_flops),
        ("maintenance_vs_budget.png", plots.maintenance_vs_budget),
    ]
    for name, plot in made:
        if plot(frame, out_dir / name):
            lines += [f"![{name}]({name})", ""]
    if plots.churn(completed(records), out_dir / "routing_churn.png"):
        lines += [
            "Routing churn during training (share of probe tokens whose expert set changed since the "
            "previous measurement, all layers):",
            "",
            "![routing_churn.png](routing_churn.png)",
            "",
        ]
    factored = [r for r in completed(records) if (r.get("routing") or {}).get("layers")]
    if factored:  # the trial whose load is least balanced is the most informative heat map
        chosen = max(factored, key=lambda r: r["routing"]["summary"]["load_max_over_mean"])
        if plots.expert_load_heatmap(chosen, out_dir / "expert_load.png"):
            lines += [
                f"Per-layer expert load of {chosen['trial_id']} ({chosen['label']}):",
                "",
                "![expert_load.png](expert_load.png)",
                "",
            ]
    return lines


def write_manifest(
    sweep_dir: Path, title: str, records: dict[str, Path], expected: list[dict], skipped: list[dict]
) -> None:
    """What the sweep's report is made of: each trial's record path (relative to the sweep
    folder; dense baselines live in the shared baselines folder beside it), the trials it
    expected (TrialConfig.describe()) and the combinations it skipped."""
    write_json_atomic(
        sweep_dir / MANIFEST,
        {
            "title": title,
            "records": {tid: os.path.relpath(path, sweep_dir) for tid, path in records.items()},
            "expected": expected,
            "skipped": skipped,
        },
    )


def build_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """The report of a sweep folder, from its manifest: exactly the records the sweep used,
    so a rebuilt report is the sweep's own. Without a manifest (a sweep from before
    manifests): the sweep's records and, per evaluation setting, the latest dense baseline."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir / "report"
    manifest_path = sweep_dir / MANIFEST
    if not manifest_path.exists():
        log.warning(
            "%s has no %s: using its records and the latest dense baseline per evaluation setting", sweep_dir, MANIFEST
        )
        records = load_records(sweep_dir / "records")
        models = {r["config"]["model"] for r in records}
        baselines = [r for r in load_records(sweep_dir.parent / "baselines") if r["config"]["model"] in models]
        return build_report(_one_baseline_each(baselines, records) + records, out_dir, title=f"Sweep {sweep_dir.name}")
    manifest = read_manifest(manifest_path)
    records = [r for rel in manifest["records"].values() if (r := read_record(sweep_dir / rel)) is not None]
    return build_report(
        records, out_dir, expected=manifest["expected"], title=manifest["title"], skipped=manifest["skipped"]
    )


MAX_MANIFEST_BYTES = 16 << 20


def read_manifest(path: Path) -> dict:
    """sweep.json, checked: a mapping with a title, records (trial id -> relative path), the
    trials expected and the combinations skipped. Raises ValueError naming what is wrong."""
    try:
        manifest = read_json_bounded(path, MAX_MANIFEST_BYTES)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a sweep manifest") from None
    except ValueError as error:
        raise ValueError(f"{path} is not a sweep manifest ({str(error)[:200]})") from None
    shapes = {"title": str, "records": dict, "expected": list, "skipped": list}
    wrong = [k for k, kind in shapes.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(k), kind)]
    if not wrong and not all(isinstance(v, str) for v in manifest["records"].values()):
        wrong = ["records (trial id -> path)"]
    if wrong:
        raise ValueError(f"{path} is not a sweep manifest: {', '.join(wrong)} missing or of the wrong type")
    return manifest


def _one_baseline_each(baselines: list[dict], records: list[dict]) -> list[dict]:
    """The shared baselines folder holds every sweep's dense trials; the report needs one
    completed baseline per evaluation setting of this sweep's records."""
    wanted = {eval_key(r) for r in completed(records)} or {eval_key(r) for r in completed(baselines)}
    chosen: dict[str, dict] = {}
    for r in sorted(completed(baselines), key=lambda r: r.get("finished_at") or ""):
        if eval_key(r) in wanted:
            chosen[eval_key(r)] = r  # the latest
    return list(chosen.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a sweep folder (<storage>/<name>) holding records/")
    parser.add_argument("--out", default=None, help="default: <sweep_dir>/report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir() or not ((sweep_dir / MANIFEST).is_file() or (sweep_dir / "records").is_dir()):
        print(
            f"error: {sweep_dir} is not a sweep folder (no {MANIFEST}, no records/); give <storage>/<name>",
            file=sys.stderr,
        )
        return 2
    if args.out and (why := output_problem(args.out, folder=True)):
        print(f"error: --out {why}", file=sys.stderr)
        return 2
    if not any((sweep_dir / "records").glob(f"**/{RECORD_FILE}")) and not (sweep_dir / MANIFEST).is_file():
        print(f"error: {sweep_dir}/records holds no {RECORD_FILE}: nothing to report", file=sys.stderr)
        return 2
    try:
        print(f"report: {build_sweep_report(sweep_dir, args.out)}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
