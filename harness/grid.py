"""Grid YAML -> validated, expanded trial configs. Plain Python: Ray only schedules.

A grid file has `axes` (lists crossed into a product), optional `include` (extra
explicit variants, each a partial override of the first value of every axis),
optional `skip` rules (each a partial match plus a reason), a `dense_baseline`
switch, shared `factor`/`train`/`eval`/`flops`/`latency` sections, and
`resources`, `failure`, `name`, `storage` for the sweep. Every problem is
collected and reported at once; nothing starts on an invalid grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .config import SECTIONS, ConfigError, TrialConfig, build_section, parse_trial
from .corpora import resolve_corpus
from .models import ModelUnavailable, ffn_width

AXES = {  # axis name -> where it lands in a trial config
    "model": ("model",), "n_experts": ("factor", "n_experts"), "top_k": ("factor", "top_k"),
    "n_routers": ("factor", "n_routers"), "data_budget_tokens": ("train", "data_budget_tokens"),
    "router_mode": ("factor", "router_mode"), "partition": ("factor", "partition"), "seed": ("seed",),
}
REQUIRED_AXES = ("model", "n_experts", "top_k")


@dataclass(frozen=True)
class Resources:
    """Per-trial resources. gpus_per_trial: 'auto' (1 where the cluster has GPUs, else 0)
    or a number (fractions share a GPU). cpus_per_trial: CPUs reserved (and torch threads)."""

    gpus_per_trial: float | str = "auto"
    cpus_per_trial: int = 2
    max_concurrent_trials: int = 0  # 0 = as many as resources allow

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.gpus_per_trial, str) and self.gpus_per_trial != "auto":
            out.append(f"resources.gpus_per_trial: {self.gpus_per_trial!r} must be 'auto' or a number >= 0")
        elif not isinstance(self.gpus_per_trial, str) and self.gpus_per_trial < 0:
            out.append(f"resources.gpus_per_trial: {self.gpus_per_trial} must be >= 0")
        if self.cpus_per_trial < 1:
            out.append(f"resources.cpus_per_trial: {self.cpus_per_trial} must be >= 1")
        if self.max_concurrent_trials < 0:
            out.append(f"resources.max_concurrent_trials: {self.max_concurrent_trials} must be >= 0")
        return out


@dataclass(frozen=True)
class Failure:
    """max_failures: retries of a crashed trial (it resumes from its training checkpoint)."""

    max_failures: int = 1

    def problems(self) -> list[str]:
        return [] if self.max_failures >= 0 else [f"failure.max_failures: {self.max_failures} must be >= 0"]


@dataclass(frozen=True)
class Skipped:
    label: str
    reason: str


@dataclass(frozen=True)
class Sweep:
    name: str
    storage: str
    trials: list[TrialConfig]  # dense baselines first
    skipped: list[Skipped]
    resources: Resources = field(default_factory=Resources)
    failure: Failure = field(default_factory=Failure)
    source: str = ""

    @property
    def baselines(self) -> list[TrialConfig]:
        return [t for t in self.trials if t.is_dense]


TOP_KEYS = ("name", "storage", "axes", "include", "skip", "dense_baseline", "factor", "train", "eval",
            "flops", "latency", "resources", "failure", "device", "trust_remote_code")


def load_grid(path: str | Path, check_models: bool = True) -> Sweep:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError([str(error)], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping"], str(path))
    return expand_grid(data, source=str(path), check_models=check_models)


def expand_grid(data: dict, source: str = "grid", check_models: bool = True) -> Sweep:
    """Validate everything, then expand; raises ConfigError listing every problem."""
    problems = [f"{k}: unknown key; allowed: {', '.join(TOP_KEYS)}" for k in sorted(set(data) - set(TOP_KEYS))]
    axes, axis_problems = _axes(data.get("axes"))
    problems += axis_problems
    resources, p1 = _section(Resources, data.get("resources", {}), "resources")
    failure, p2 = _section(Failure, data.get("failure", {}), "failure")
    problems += p1 + p2
    complete = all(k in axes for k in REQUIRED_AXES)
    candidates, skipped, expand_problems = _candidates(data, axes) if complete else ([], [], [])
    problems += expand_problems
    trials = []
    for _, trial_data in candidates:
        config, trial_problems = parse_trial(trial_data)
        problems += trial_problems  # shared-section problems repeat per trial: deduplicated below
        if config is not None:
            trials.append(config)
    if check_models:
        problems += _check_models(axes, data.get("include") or [], bool(data.get("trust_remote_code")))
    problems += _check_corpus((data.get("train") or {}).get("corpus", "enwiki-gensim"), "train.corpus")
    problems += _check_corpus((data.get("eval") or {}).get("heldout_text", "lee-news"), "eval.heldout_text")
    problems = list(dict.fromkeys(problems))  # the same problem in many trials: say it once
    if problems:
        raise ConfigError(problems, source)
    unique = list({t.trial_id: t for t in trials}.values())
    unique.sort(key=lambda t: not t.is_dense)
    return Sweep(str(data.get("name", Path(source).stem)), str(data.get("storage", "runs/sweeps")),
                 unique, skipped, resources, failure, source)


def _section(cls, data, prefix):
    built, problems = build_section(cls, data or {}, prefix)
    if built is not None:
        problems += built.problems()
    return built, problems


def _axes(raw) -> tuple[dict, list[str]]:
    if not isinstance(raw, dict):
        return {}, ["axes: must be a mapping of axis -> list of values"]
    problems = [f"axes.{k}: unknown axis; allowed: {', '.join(AXES)}" for k in sorted(set(raw) - set(AXES))]
    problems += [f"axes.{k}: required" for k in REQUIRED_AXES if k not in raw]
    axes = {}
    for name, values in raw.items():
        if name not in AXES:
            continue
        values = values if isinstance(values, list) else [values]
        if not values:
            problems.append(f"axes.{name}: empty list")
        axes[name] = values
    return axes, problems


def _place(trial: dict, axis: str, value) -> None:
    target = trial
    *parents, leaf = AXES[axis]
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = value


def _base_trial(data: dict) -> dict:
    base = {k: data[k] for k in ("device", "trust_remote_code") if k in data}
    for section in SECTIONS:
        if section in data:
            base[section] = dict(data[section] or {})
    return base


def _candidates(data: dict, axes: dict) -> tuple[list, list[Skipped], list[str]]:
    """(label, trial dict) for every combination, the skipped ones with reasons, and problems."""
    base, shared_factor = _base_trial(data), dict(data.get("factor") or {})
    rules, problems = _skip_rules(data.get("skip"))
    names = list(axes)
    points = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
    for i, extra in enumerate(data.get("include") or []):
        if not isinstance(extra, dict) or set(extra) - set(AXES):
            problems.append(f"include[{i}]: must map axis names ({', '.join(AXES)}) to single values")
            continue
        points.append({**{n: v[0] for n, v in axes.items()}, **extra})
    out, skipped = [], []
    for point in points:
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        reason = _skip_reason(point, rules)
        if reason:
            skipped.append(Skipped(label, reason))
            continue
        trial = {**base, "factor": dict(shared_factor)}
        trial = {k: (dict(v) if isinstance(v, dict) else v) for k, v in trial.items()}
        for axis, value in point.items():
            _place(trial, axis, value)
        out.append((label, trial))
    if data.get("dense_baseline", True):
        for model in axes.get("model", []):
            dense = {k: v for k, v in base.items() if k != "train"}
            dense.update(model=model, factor=None)
            out.append((f"model={model}, dense", dense))
    return out, skipped, problems


def _skip_rules(raw) -> tuple[list[tuple[dict, str]], list[str]]:
    rules, problems = [], []
    for i, rule in enumerate(raw or []):
        if not isinstance(rule, dict) or not isinstance(rule.get("when"), dict) or "reason" not in rule:
            problems.append(f"skip[{i}]: needs `when` (axis -> value or list) and `reason`")
            continue
        unknown = set(rule["when"]) - set(AXES)
        if unknown:
            problems.append(f"skip[{i}].when: unknown axes {sorted(unknown)}; allowed: {', '.join(AXES)}")
            continue
        rules.append((rule["when"], str(rule["reason"])))
    return rules, problems


def _skip_reason(point: dict, rules) -> str | None:
    """Built-in rule first (top_k > n_experts cannot exist), then the grid's own rules."""
    if point.get("top_k", 0) > point.get("n_experts", 0) and "n_experts" in point:
        return f"rule: top_k > n_experts ({point['top_k']} > {point['n_experts']})"
    for when, reason in rules:
        if all(point.get(k) in (v if isinstance(v, list) else [v]) for k, v in when.items()):
            return f"skip rule: {reason}"
    return None


def _check_models(axes: dict, includes: list, trust_remote_code: bool) -> list[str]:
    """Every model must be obtainable, and every expert count must divide its FFN width."""
    n_values = set(axes.get("n_experts", [])) | {i["n_experts"] for i in includes
                                                 if isinstance(i, dict) and "n_experts" in i}
    models = set(axes.get("model", [])) | {i["model"] for i in includes if isinstance(i, dict) and "model" in i}
    problems = []
    for model in sorted(models, key=str):
        try:
            width = ffn_width(model, trust_remote_code=trust_remote_code)
        except (ModelUnavailable, ValueError, OSError) as error:
            problems.append(f"axes.model: {error}")
            continue
        for n in sorted(v for v in n_values if isinstance(v, int) and v > 0 and width % v):
            divisors = [d for d in range(1, 65) if width % d == 0]
            problems.append(f"axes.n_experts: {n} does not divide the FFN width {width} of {model}; "
                            f"allowed (<= 64): {divisors}")
    return problems


def _check_corpus(corpus, field: str) -> list[str]:
    try:
        resolve_corpus(corpus)
        return []
    except (ValueError, RuntimeError, AttributeError) as error:
        return [f"{field}: {error}"]


def trial_table(sweep: Sweep) -> str:
    """The expanded trials and the skipped combinations, as a markdown table (for --dry-run)."""
    lines = ["| # | trial_id | model | setting | router_mode | partition | budget | seed |",
             "|---:|---|---|---|---|---|---:|---:|"]
    for i, t in enumerate(sweep.trials, 1):
        f = t.factor
        lines.append(f"| {i} | {t.trial_id} | {t.model} | {'dense' if f is None else f.name} | "
                     f"{'-' if f is None else f.router_mode} | {'-' if f is None else f.partition} | "
                     f"{'-' if f is None else t.train.data_budget_tokens} | {t.seed} |")
    if sweep.skipped:
        lines += ["", f"skipped {len(sweep.skipped)} combination(s):"]
        lines += [f"- {s.label}: {s.reason}" for s in sweep.skipped]
    return "\n".join(lines)
