"""matplotlib figures for the report (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .tables import pareto_front  # noqa: E402


def maintenance_vs_flops(frame: pd.DataFrame, path: Path) -> Path | None:
    points = frame.dropna(subset=["ffn_gflops", "maintenance_pct"])
    if points.empty:
        return None
    front = points[pareto_front(points)].sort_values("ffn_gflops")
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, group in points.groupby("router_mode"):
        ax.scatter(group["ffn_gflops"], group["maintenance_pct"], label="dense" if mode == "-" else mode)
        for _, row in group.iterrows():
            ax.annotate(row["setting"], (row["ffn_gflops"], row["maintenance_pct"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.plot(front["ffn_gflops"], front["maintenance_pct"], "k--", lw=1, label="Pareto frontier")
    ax.set(xlabel="FFN GFLOPs per token (fvcore, MACs)", ylabel="relative maintenance (% of dense)",
           title="Accuracy kept vs FFN compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def maintenance_vs_budget(frame: pd.DataFrame, path: Path) -> Path | None:
    points = frame.dropna(subset=["budget", "maintenance_pct"])
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (setting, mode), group in points.groupby(["setting", "router_mode"]):
        group = group.sort_values("budget")
        ax.plot(group["budget"], group["maintenance_pct"], "o-", label=f"{setting} {mode}")
    ax.set(xlabel="router-training tokens", ylabel="relative maintenance (% of dense)",
           title="Data efficiency")
    if points["budget"].min() > 0:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
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
