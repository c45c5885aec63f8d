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
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from factorllm_core.config import MAX_EXPERTS
from factorllm_core.options import Bound, setting
from harness.assets.corpora import resolve_corpus
from harness.assets.models import ModelUnavailable, ffn_width, memory_problem
from harness.config import (
    SECTIONS,
    ConfigError,
    EvalConfig,
    TrainConfig,
    TrialConfig,
    axis_options,
    build_section,
    load_yaml,
    parse_trial,
    path_text_problem,
    read_config_text,
    resolve_precision,
    short,
)
from harness.train import SCHEDULER_METRICS
from reports.record import output_problem

REQUIRED_AXES = ("model", "n_experts", "top_k")


@dataclass(frozen=True)
class Resources:
    """Per-trial resources. gpus_per_trial: 'auto' (1 where the cluster has GPUs, else 0)
    or a number (fractions share a GPU). cpus_per_trial: CPUs reserved (and torch threads)."""

    gpus_per_trial: float | str = setting("auto", bound=Bound(0, 64, why="GPUs one trial can use on one node"))
    cpus_per_trial: int = setting(2, bound=Bound(1, 1024, why="CPUs one trial can use on one node"))
    max_concurrent_trials: int = setting(0, bound=Bound(0, 10_000))  # 0 = as many as resources allow

    def problems(self) -> list[str]:
        if isinstance(self.gpus_per_trial, str) and self.gpus_per_trial != "auto":
            return [f"resources.gpus_per_trial: {short(self.gpus_per_trial)} must be 'auto' or a number >= 0"]
        return []


@dataclass(frozen=True)
class Failure:
    """max_failures: retries of a crashed trial (it resumes from its training checkpoint)."""

    max_failures: int = setting(1, bound=Bound(0, 100, why="retries of a crashed trial"))

    def problems(self) -> list[str]:
        return []


SCHEDULERS = ("none", "asha")


@dataclass(frozen=True)
class Scheduler:
    """Early stopping by Ray Tune (`scheduler:` in the grid; default none: every trial runs its
    whole budget). asha: asynchronous successive halving on `metric` (heldout_loss: the
    held-out slice's loss, reported every train.heldout_every steps; or lm, the training
    loss) against tokens seen: a trial is stopped at a rung (grace_tokens x
    reduction_factor^k, below max_tokens) unless it is in the best 1/reduction_factor of the
    trials that reached that rung; a trial past the last rung trains to its budget. A
    stopped trial gets a record with status `stopped`, its last reported metrics and the
    tokens it used."""

    type: str = "none"
    metric: str = "heldout_loss"
    mode: str = "min"
    grace_tokens: int = setting(4096, bound=Bound(1, 10**11, unit="tokens"))
    reduction_factor: int = setting(2, bound=Bound(2, 100, unit="(ASHA keeps 1 in reduction_factor at each rung)"))
    max_tokens: int = setting(10**9, bound=Bound(1, 10**12, unit="tokens"))

    def problems(self) -> list[str]:
        out = []
        if self.type not in SCHEDULERS:
            out.append(f"scheduler.type: {short(self.type)} must be one of {', '.join(SCHEDULERS)}")
        if self.metric not in SCHEDULER_METRICS:
            out.append(f"scheduler.metric: {short(self.metric)} must be one of {', '.join(SCHEDULER_METRICS)}")
        if self.mode not in ("min", "max"):
            out.append(f"scheduler.mode: {short(self.mode)} must be min or max")
        if self.max_tokens < self.grace_tokens:
            out.append(f"scheduler.max_tokens: {self.max_tokens} must be >= grace_tokens={self.grace_tokens}")
        return out


TRACKERS = ("tensorboard", "mlflow")


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
    scheduler: Scheduler = field(default_factory=Scheduler)
    tracking: tuple[str, ...] = ("tensorboard",)

    def with_precision(self, on_gpu: bool) -> Sweep:
        """Every trial's `precision: auto` fixed for where it runs (GPU workers: bf16, CPU:
        fp32), so records made on another device or dtype never share a trial id, and a
        variant is never paired with, nor reuses, a dense baseline made in another dtype."""

        def fixed(t: TrialConfig) -> TrialConfig:
            device = t.device if t.device != "auto" else ("cuda" if on_gpu else "cpu")
            return replace(t, precision=resolve_precision(t.precision, device))

        return replace(self, trials=[fixed(t) for t in self.trials])


# the grid's own keys, then the trial's fields that are not axes (sections and settings shared by every trial)
GRID_KEYS = ("name", "storage", "axes", "include", "skip", "dense_baseline", "resources", "failure", "scheduler",
             "tracking")  # fmt: skip
TRIAL_KEYS = tuple(f.name for f in fields(TrialConfig) if f.name not in axis_options())
TOP_KEYS = GRID_KEYS + TRIAL_KEYS


def load_grid(path: str | Path, check_models: bool = True) -> Sweep:
    path = Path(path)
    try:
        data = load_yaml(read_config_text(path))
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError([str(error)], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping"], str(path))
    return expand_grid(data, source=str(path), check_models=check_models)


def expand_grid(data: dict, source: str = "grid", check_models: bool = True) -> Sweep:
    """Validate everything, then expand; raises ConfigError listing every problem.
    Types are checked before any value is compared or used, so a wrong type is a
    problem in the list, never a traceback."""
    problems = [
        f"{str(k)[:80]}: unknown key; allowed: {', '.join(TOP_KEYS)}"
        for k in sorted(set(data) - set(TOP_KEYS), key=str)
    ]
    # a section is a mapping or absent (null: empty); 0, false, "" or [] are mistakes, not "defaults"
    bad_sections = [
        s for s in (*SECTIONS, "factor", "resources", "failure", "scheduler") if not _mapping_or_none(data.get(s))
    ]
    sections_ok = not bad_sections
    problems += [f"{s}: {short(data[s])} must be a mapping (or left out)" for s in bad_sections]
    name, storage, naming_problems = _name_and_storage(data, source)
    problems += naming_problems
    if not isinstance(data.get("dense_baseline", True), bool):
        problems.append(f"dense_baseline: {short(data['dense_baseline'])} must be true or false")
    axes, axis_problems, axes_usable = _axes(data.get("axes"))
    problems += axis_problems
    include_problems = _include_problems(data.get("include"))
    problems += include_problems
    resources, p1 = _section(Resources, data.get("resources"), "resources")
    failure, p2 = _section(Failure, data.get("failure"), "failure")
    scheduler, p3 = _section(Scheduler, data.get("scheduler"), "scheduler")
    tracking, p4 = _tracking(data.get("tracking", ["tensorboard"]))
    problems += p1 + p2 + p3 + p4
    complete = all(k in axes for k in REQUIRED_AXES) and axes_usable and not include_problems and sections_ok
    candidates, skipped, expand_problems = _candidates(data, axes) if complete else ([], [], [])
    problems += expand_problems
    trials = []
    for _, trial_data in candidates:
        config, trial_problems = parse_trial(trial_data)
        problems += trial_problems  # shared-section problems repeat per trial: deduplicated below
        if config is not None:
            trials.append(config)
    if check_models and complete:
        problems += _check_models(axes, data.get("include") or [], [t for _, t in candidates])
    texts = (("train", "corpus", TrainConfig.corpus), ("eval", "heldout_text", EvalConfig.heldout_text))
    for section, key, default in texts:
        value = (data.get(section) or {}).get(key, default) if sections_ok else default
        if isinstance(value, str) and not path_text_problem("", value):  # else reported by the section's check
            problems += _check_corpus(value, f"{section}.{key}")
    problems += served_problems(trials)
    if scheduler is not None and scheduler.type != "none" and scheduler.metric == "heldout_loss":
        if any(t.train.heldout_every == 0 for t in trials if not t.is_dense):
            problems.append(
                "scheduler.metric: heldout_loss needs train.heldout_every > 0 (the held-out loss is what the "
                "scheduler compares); set it, or use metric: lm"
            )
    problems = list(dict.fromkeys(problems))  # the same problem in many trials: say it once
    if problems:
        raise ConfigError(problems, source)
    unique = list({t.trial_id: t for t in trials}.values())
    unique.sort(key=lambda t: not t.is_dense)
    return Sweep(name, storage, unique, skipped, resources, failure, source, scheduler, tracking)


def served_problems(trials) -> list[str]:
    """latency.engine: llama.cpp needs the llama.cpp extra: say so before any trial trains, not at
    each trial's last stage."""
    from harness import serve

    if any(t.latency.engine == "llama.cpp" and not t.is_dense for t in trials) and (why := serve.unavailable()):
        return [f"latency.engine: llama.cpp, but {why}"]
    return []


def _tracking(raw) -> tuple[tuple[str, ...], list[str]]:
    """`tracking`: a tracker or a list of them (tensorboard, the default; mlflow through Ray's
    MLflow callback, which needs the mlflow package and MLFLOW_TRACKING_URI)."""
    values = raw if isinstance(raw, list) else [raw]
    bad = [v for v in values if v not in TRACKERS]
    if bad:
        return (), [f"tracking: {short(bad[0])} is not a tracker; allowed: {', '.join(TRACKERS)} (or a list)"]
    problems = []
    if "mlflow" in values:
        import importlib.util
        import os

        if importlib.util.find_spec("mlflow") is None:
            problems.append("tracking: mlflow needs the mlflow package (pip install mlflow)")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            problems.append("tracking: mlflow needs MLFLOW_TRACKING_URI (e.g. file:///path/to/mlruns or a server URL)")
    return tuple(dict.fromkeys(values)), problems


# A sweep's name becomes a folder under storage: a plain name, never a path, and not
# the shared baselines folder.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = ("baselines",)


def _name_and_storage(data: dict, source: str) -> tuple[str, str, list[str]]:
    problems = []
    name = data.get("name", Path(source).stem)
    where = "name" if "name" in data else f"name (from the file name {Path(source).name!r}; set name:)"
    if not isinstance(name, str) or not NAME.match(name) or name in RESERVED_NAMES:
        problems.append(
            f"{where}: {short(name)} must be a plain name (letters, digits, '_', '.', '-'; "
            f"no path separators; at most 64 characters; not {', '.join(RESERVED_NAMES)})"
        )
    storage = data.get("storage", "runs/sweeps")
    if not isinstance(storage, str) or not storage.strip():
        problems.append(f"storage: {short(storage)} must be a folder path (a string)")
    elif problem := path_text_problem("storage", storage) or output_problem(storage, folder=True):
        problems.append(problem if problem.startswith("storage") else f"storage: {problem}")
    return str(name), str(storage), problems


def _mapping_or_none(value) -> bool:
    return value is None or isinstance(value, dict)


def _section(cls, data, prefix):
    if not _mapping_or_none(data):
        return None, []  # reported with the other sections
    built, problems = build_section(cls, data or {}, prefix)
    if built is not None:
        problems += built.problems()
    return built, problems


def _axis_value_problem(axis: str, value, where: str) -> str | None:
    expected = axis_options()[axis].type
    if expected is bool:
        ok = isinstance(value, bool)
    else:
        accepted = (int, float) if expected is float else expected
        ok = isinstance(value, accepted) and not isinstance(value, bool)
    if ok:
        return None
    words = {int: "an integer", float: "a number", bool: "true or false"}
    return f"{where}: {short(value)} is not {words.get(expected, 'a string')}"


def _axes(raw) -> tuple[dict, list[str], bool]:
    """(known axes -> values, problems, whether every value has its type and no list is
    empty, i.e. whether the grid can be expanded to find the remaining problems)."""
    if not isinstance(raw, dict):
        return {}, ["axes: must be a mapping of axis -> list of values"], False
    known = axis_options()
    problems = [
        f"axes.{str(k)[:80]}: unknown axis; allowed: {', '.join(known)}" for k in sorted(set(raw) - set(known), key=str)
    ]
    problems += [f"axes.{k}: required" for k in REQUIRED_AXES if k not in raw]
    axes, usable = {}, True
    for name, values in raw.items():
        if name not in known:
            continue
        values = values if isinstance(values, list) else [values]
        bad = [p for v in values if (p := _axis_value_problem(name, v, f"axes.{name}"))]
        if not values:
            bad.append(f"axes.{name}: empty list")
        problems += bad
        usable = usable and not bad
        axes[name] = values
    return axes, problems, usable


def _include_problems(raw) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return [f"include: {short(raw)} must be a list of variants (axis -> value)"]
    if len(raw) > MAX_TRIALS:  # before each is validated
        return [f"include: {len(raw):,} variants; at most {MAX_TRIALS:,} in one grid: split it into several grid files"]
    problems = []
    for i, extra in enumerate(raw):
        if not isinstance(extra, dict) or not extra or set(extra) - set(axis_options()):
            problems.append(
                f"include[{i}]: {short(extra)} must map axis names ({', '.join(axis_options())}) to single values"
            )
            continue
        problems += [p for k, v in extra.items() if (p := _axis_value_problem(k, v, f"include[{i}].{k}"))]
    return problems


def _place(trial: dict, axis: str, value) -> None:
    target = trial
    *parents, leaf = axis_options()[axis].path
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = value


def _base_trial(data: dict) -> dict:
    base = {k: data[k] for k in TRIAL_KEYS if k in data and k != "factor" and k not in SECTIONS}
    for section in SECTIONS:
        if section in data:  # mappings (checked before expansion)
            base[section] = dict(data[section] or {})
    return base


def _candidates(data: dict, axes: dict) -> tuple[list, list[Skipped], list[str]]:
    """(label, trial dict) for every combination, the skipped ones with reasons, and problems."""
    base, shared_factor = _base_trial(data), dict(data.get("factor") or {})  # mappings: checked before
    rules, problems = _skip_rules(data.get("skip"))
    if why := _grid_size_problem(axes, data.get("include") or []):
        return [], [], problems + [why]  # before anything expands: 10^9 combinations would not fit in memory
    names = list(axes)
    points = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
    for extra in data.get("include") or []:  # checked by _include_problems
        points.append({**{n: v[0] for n, v in axes.items()}, **extra})
    out, skipped = [], []
    if points and rules and all(_skip_reason(p, rules) for p in points) and not problems:
        problems.append(
            f"skip: the rules skip all {len(points)} factorized combinations; the sweep would train nothing. "
            "Narrow a rule's `when`"
        )
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
    if data.get("dense_baseline", True):  # every model a variant uses, from the axes or an include
        for model in dict.fromkeys(p["model"] for p in points if "model" in p):
            dense = {k: v for k, v in base.items() if k != "train"}
            dense.update(model=model, factor=None)
            out.append((f"model={model}, dense", dense))
    return out, skipped, problems


MAX_TRIALS = 2_000  # a week of the largest trials on a 16-GPU cluster; far beyond any one grid here


def _grid_size_problem(axes: dict, includes: list) -> str | None:
    """How many combinations the axes and includes make, said before any is built."""
    sizes = {name: len(values) for name, values in axes.items()}
    total = math.prod(sizes.values()) + len(includes)
    if total <= MAX_TRIALS:
        return None
    parts = [" x ".join(f"{n} {name}" for name, n in sizes.items() if n > 1) or "1 combination of the axes"]
    parts += [f"{len(includes):,} includes"] if includes else []
    return (
        f"axes: the grid expands to {total:,} trials ({' + '.join(parts)}); at most {MAX_TRIALS:,} in one grid: "
        "split it into several grid files (e.g. one per model or per seed), each run with its own name"
    )


SKIP_RULE_KEYS = ("when", "reason")


def _skip_rules(raw) -> tuple[list[tuple[dict, str]], list[str]]:
    """Each rule: `when` (axis -> value or list of values, each of the axis's type) and a
    non-empty `reason`; nothing else. Validated like any other field: a rule that could never
    match, or one that would match everything, is a mistake."""
    rules, problems = [], []
    if raw is not None and not isinstance(raw, list):
        return [], [f"skip: {short(raw)} must be a list of rules (when, reason)"]
    for i, rule in enumerate(raw or []):
        where = f"skip[{i}]"
        if not isinstance(rule, dict):
            problems.append(f"{where}: {short(rule)} must be a mapping with `when` and `reason`")
            continue
        unknown = sorted(set(rule) - set(SKIP_RULE_KEYS), key=str)
        if unknown:
            problems.append(f"{where}: unknown key {short(unknown[0])}; a rule has only {', '.join(SKIP_RULE_KEYS)}")
        when, reason = rule.get("when"), rule.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            problems.append(f"{where}.reason: {short(reason)} must be a sentence saying why (a non-empty string)")
        if not isinstance(when, dict) or not when:
            problems.append(
                f"{where}.when: {short(when)} must map at least one axis to a value or list "
                "(an empty `when` would skip every trial)"
            )
            continue
        unknown_axes = set(when) - set(axis_options())
        if unknown_axes:
            problems.append(
                f"{where}.when: unknown axes {short(sorted(unknown_axes, key=str))}; "
                f"allowed: {', '.join(axis_options())}"
            )
            continue
        bad = []
        for axis, value in when.items():
            values = value if isinstance(value, list) else [value]
            if not values or any(isinstance(v, (dict, list)) for v in values):
                bad.append(f"{where}.when: values must be single values or lists of them")
            else:
                bad += [p for v in values if (p := _axis_value_problem(axis, v, f"{where}.when.{axis}"))]
        problems += bad
        if not bad and not unknown and isinstance(reason, str) and reason.strip():
            rules.append((when, reason))
    return rules, problems


def _skip_reason(point: dict, rules) -> str | None:
    """Built-in rule first (top_k > n_experts cannot exist), then the grid's own rules.
    (Axis values are type-checked before expansion: top_k and n_experts are ints. The built-in
    rule holds only for valid counts: n_experts = -1 is refused as invalid, not skipped.)"""
    n, k = point.get("n_experts"), point.get("top_k", 0)
    if isinstance(n, int) and n >= 1 and k >= 1 and k > n:
        return f"rule: top_k > n_experts ({k} > {n})"
    for when, reason in rules:
        if all(point.get(k) in (v if isinstance(v, list) else [v]) for k, v in when.items()):
            return f"skip rule: {reason}"
    return None


def _check_models(axes: dict, includes: list, trials: list[dict]) -> list[str]:
    """Every model must be obtainable, and every trial's expert count (shared experts
    included) must divide its model's FFN width. Reads configs as JSON: validation never
    runs a model's code, whatever trust_remote_code says."""
    models = set(axes.get("model", [])) | {i["model"] for i in includes if isinstance(i, dict) and "model" in i}
    problems, widths = [], {}
    for model in sorted(models, key=str):
        try:
            widths[model] = ffn_width(model)
            if why := memory_problem(model):
                problems.append(f"axes.model: {why}")
        except (ModelUnavailable, ValueError, OSError) as error:
            problems.append(f"axes.model: {error}")
    factors = [(t.get("model"), t["factor"]) for t in trials if isinstance(t.get("factor"), dict)]
    groups = sorted(
        {
            (model, f.get("n_experts"), f.get("n_shared", 0))
            for model, f in factors
            if isinstance(f.get("n_experts"), int)
            and isinstance(f.get("n_shared", 0), int)
            and 0 < f.get("n_experts") <= MAX_EXPERTS  # else the factor's own bound says so, once
            and 0 <= f.get("n_shared", 0) < MAX_EXPERTS
        },
        key=str,
    )
    for model, n, shared in groups:
        width = widths.get(model)
        if width is None or width % (n + shared) == 0:
            continue
        divisors = [d for d in range(1, 65) if width % d == 0]
        what = f"{n}" if not shared else f"{n} with n_shared {shared} ({n + shared} experts in all)"
        problems.append(
            f"axes.n_experts: {what} does not divide the FFN width {width} of {model}; allowed (<= 64): {divisors}"
        )
    return problems


def _check_corpus(corpus, field: str) -> list[str]:
    try:
        resolve_corpus(corpus)
        return []
    except (ValueError, RuntimeError, AttributeError) as error:
        return [f"{field}: {error}"]


def trial_table(sweep: Sweep) -> str:
    """The expanded trials and the skipped combinations, as a markdown table (for --dry-run)."""
    lines = [
        "| # | trial_id | model | setting | active FFN | router_mode | partition | recipe | budget | lr | seed |",
        "|---:|---|---|---|---:|---|---|---|---:|---:|---:|",
    ]
    for i, t in enumerate(sweep.trials, 1):
        f = t.factor
        lines.append(
            f"| {i} | {t.trial_id} | {t.model} | {'dense' if f is None else f.name} | "
            f"{'100%' if f is None else f'{f.active_fraction:.1%}'} | "
            f"{'-' if f is None else f.router_mode} | {'-' if f is None else f.partition} | "
            f"{'-' if f is None else t.recipe or 'paper'} | "
            f"{'-' if f is None else t.train.data_budget_tokens} | "
            f"{'-' if f is None else f'{t.train.lr:g}'} | {t.seed} |"
        )
    if sweep.skipped:
        lines += ["", f"skipped {len(sweep.skipped)} combination(s):"]
        lines += [f"- {s.label}: {s.reason}" for s in sweep.skipped]
    return "\n".join(lines)
