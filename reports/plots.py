"""matplotlib figures for the report (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .tables import pareto_front  # noqa: E402


def _yerr(group: pd.DataFrame, column: str):
    """Asymmetric error bars from NAME_lo / NAME_hi (zero where an interval is missing)."""
    low = (group[column] - group[f"{column}_lo"]).fillna(0).clip(lower=0)
    high = (group[f"{column}_hi"] - group[column]).fillna(0).clip(lower=0)
    return [low.to_numpy(), high.to_numpy()]


def _quality_vs_flops(
    frame: pd.DataFrame, path: Path, column: str, ylabel: str, title: str, frontier: bool
) -> Path | None:
    points = frame.dropna(subset=["ffn_gflops", column])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, group in points.groupby("router_mode"):
        ax.errorbar(
            group["ffn_gflops"],
            group[column],
            yerr=_yerr(group, column),
            fmt="o",
            capsize=3,
            label="dense" if mode == "-" else mode,
        )
        for _, row in group.iterrows():
            ax.annotate(
                row["setting"], (row["ffn_gflops"], row[column]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    if frontier:
        front = points[pareto_front(points)].sort_values("ffn_gflops")
        ax.plot(front["ffn_gflops"], front[column], "k--", lw=1, label="Pareto frontier (point values)")
    ax.set(xlabel="FFN GFLOPs per token (fvcore, MACs)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def maintenance_vs_flops(frame: pd.DataFrame, path: Path) -> Path | None:
    return _quality_vs_flops(
        frame,
        path,
        "maintenance_pct",
        "relative maintenance (% of dense, 95% CI)",
        "Accuracy kept vs FFN compute",
        frontier=True,
    )


def heldout_loss_vs_flops(frame: pd.DataFrame, path: Path) -> Path | None:
    return _quality_vs_flops(
        frame, path, "heldout_loss", "held-out LM loss (nats, 95% CI)", "Held-out loss vs FFN compute", frontier=False
    )


def maintenance_vs_budget(frame: pd.DataFrame, path: Path) -> Path | None:
    points = frame.dropna(subset=["budget", "maintenance_pct"])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (setting, mode), group in points.groupby(["setting", "router_mode"]):
        group = group.sort_values("budget")
        ax.errorbar(
            group["budget"],
            group["maintenance_pct"],
            yerr=_yerr(group, "maintenance_pct"),
            fmt="o-",
            capsize=3,
            label=f"{setting} {mode}",
        )
    ax.set(xlabel="router-training tokens", ylabel="relative maintenance (% of dense, 95% CI)", title="Data efficiency")
    if points["budget"].min() > 0:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def churn(records: list[dict], path: Path) -> Path | None:
    """Routing churn per measured training step, one line per trial that measured it."""
    series = [
        (r["label"], r["training"]["churn"]["series"])
        for r in records
        if ((r.get("training") or {}).get("churn") or {}).get("series")
    ]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=label)
    ax.set(
        xlabel="optimizer step",
        ylabel="routing churn (share of probe tokens)",
        title="Routing churn during training",
        ylim=(0, 1),
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def heldout_curves(records: list[dict], path: Path) -> Path | None:
    """Held-out slice loss against training tokens, one line per trial that measured it;
    trials a scheduler stopped are dashed."""
    curves = []
    for r in records:
        points = [p for p in (r.get("training") or {}).get("series") or [] if p.get("heldout_loss") is not None]
        if points and r.get("status") in ("completed", "stopped"):
            curves.append((r["label"], r["status"] == "stopped", points))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, stopped, points in curves:
        ax.plot([p["tokens"] for p in points], [p["heldout_loss"] for p in points], "x--" if stopped else "o-",
                ms=3, label=label + (" (stopped)" if stopped else ""))  # fmt: skip
    ax.set(xlabel="training tokens", ylabel="held-out slice loss (nats)", title="Held-out loss during training")
    ax.legend(fontsize=6)
    return _save(fig, path)


def expert_load_heatmap(record: dict, path: Path) -> Path | None:
    layers = (record.get("routing") or {}).get("layers") or []
    if not layers:
        return None
    load = [[count / max(1, sum(layer["expert_load"])) for count in layer["expert_load"]] for layer in layers]
    fig, ax = plt.subplots(figsize=(4.5, max(3, len(load) * 0.18)))
    image = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="layer")
    ax.set_title(f"Expert load share\n{record['label']}", fontsize=8)
    ax.set_xticks(range(len(load[0])))
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _against_params(rows: pd.DataFrame, column: str):
    """(figure, axes, [(conversion, its rows by size)]) for a plot of `column` against parameters, or None."""
    points = rows.dropna(subset=["params_m", column])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    return fig, ax, [(name, group.sort_values("params_m")) for name, group in points.groupby("conversion")]


def gap_vs_params(rows: pd.DataFrame, path: Path) -> Path | None:
    """The gap to dense (bits per byte) against parameters, one line per conversion and training
    seed (a conversion's further seeds dotted, in its colour)."""
    if (made := _against_params(rows, "gap_bpb")) is None:
        return None
    fig, ax, groups = made
    for conversion, group in groups:
        runs = list(group.groupby("seed")) if "seed" in group else [(None, group)]
        color = None
        for seed, run in runs:
            label = conversion if len(runs) == 1 else f"{conversion}: seed {seed}"
            style = "o-" if color is None else "o:"
            bars = ax.errorbar(run["params_m"], run["gap_bpb"], yerr=_yerr(run, "gap_bpb"), fmt=style, capsize=3,
                               color=color, label=label)  # fmt: skip
            color = bars[0].get_color()
    ax.set(xscale="log", xlabel="parameters (M)", ylabel="gap to dense (bits per byte, 95% CI)",
           title="Quality lost by the conversion, against model size")  # fmt: skip
    ax.legend(fontsize=7)
    return _save(fig, path)


def decode_vs_params(rows: pd.DataFrame, path: Path) -> Path | None:
    """Decode speedup against parameters: eager and served where measured, the ideal from bytes."""
    if (made := _against_params(rows, "ideal_decode")) is None:
        return None
    fig, ax, groups = made
    for conversion, group in groups:
        line = ax.plot(group["params_m"], group["ideal_decode"], "--", label=f"{conversion}: ideal (bytes)")[0]
        for column, marker, what in (("decode_speedup", "o", "eager"), ("served_decode_speedup", "s", "served")):
            measured = group.dropna(subset=[column]) if column in group else group.iloc[0:0]
            if not measured.empty:
                ax.plot(measured["params_m"], measured[column], marker, color=line.get_color(),
                        label=f"{conversion}: {what}")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="parameters (M)", ylabel="decode speed vs dense (x)",
           title="Decode speedup against model size")  # fmt: skip
    ax.legend(fontsize=6)
    return _save(fig, path)


def gap_vs_tokens(curves: list, path: Path) -> Path | None:
    """The gap to dense against training tokens (log axis), with the fitted power law."""
    import numpy as np

    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        values = [g.value for g in c.gaps]
        yerr = [[max(0, g.value - g.low) for g in c.gaps], [max(0, g.high - g.value) for g in c.gaps]]
        dots = ax.errorbar(c.tokens, values, yerr=yerr, fmt="o", capsize=3, label=f"{c.model} {c.conversion}")
        if c.fit is not None:
            cc, a, b = c.fit.point
            for low, high, style in ((min(c.tokens), max(c.tokens), "-"), (max(c.tokens), 10 * max(c.tokens), ":")):
                grid = np.geomspace(low, high, 50)
                ax.plot(grid, cc + a * grid**-b, style, color=dots[0].get_color(), lw=1)
    ax.set(xscale="log", xlabel="training tokens", ylabel="gap to dense (nats per token, 95% CI)",
           title="Quality lost against data budget (lines: fit; dotted: extrapolated)")  # fmt: skip
    ax.legend(fontsize=7)
    return _save(fig, path)
