"""TrialConfig: one experiment, built from a mapping with every problem collected, and the
options that define a variant (declared on the config fields: factorllm_core/options.py)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from factorllm_core import DISPATCH, FactorConfig
from factorllm_core.options import (
    NEVER,
    UNLESS_DEFAULT,
    WHERE_EXPERTS_RUN,
    Bound,
    Declared,
    bound_of,
    compared_of,
    declared,
    option,
    setting,
    type_hints,
)
from harness.config import identity
from harness.config.fields import ConfigError, build_section, coerce, path_text_problem, short, type_name
from harness.config.sections import EvalConfig, FlopsConfig, LatencyConfig, TrainConfig
from harness.config.yaml_io import load_yaml, read_config_text


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
    seed: int = option(0, bound=Bound(0, 2**31 - 1, why="a seed"))
    device: str = setting("auto", identity=NEVER)  # where, not what
    trust_remote_code: bool = False
    keep_checkpoints: bool = setting(False, identity=NEVER)  # what is kept on disk, not what is measured
    precision: str = setting("auto", identity=UNLESS_DEFAULT)  # added later
    dispatch: str = setting("auto", identity=WHERE_EXPERTS_RUN)  # added later

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
        other = {
            f.name: getattr(self.train, f.name)
            for f in fields(TrainConfig)
            if f.name not in declared_train and compared_of(f)
        }
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
        """Stable id from content: same config -> same id, on any machine (harness/config/identity.py)."""
        return identity.trial_id(self)

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
    for key in sorted(set(data) - set(top), key=str):  # YAML keys may be numbers or null
        problems.append(f"{str(key)[:80]}: unknown key; allowed: {', '.join(top)}")
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
    hints = type_hints(TrialConfig)
    for name in sorted(set(data) & set(top) - {"factor", *SECTIONS}):  # the plain fields
        coerced, ok = coerce(data[name], hints[name])
        if not ok:
            problems.append(f"{name}: {short(data[name])} must be {type_name(hints[name])}")
        elif problem := (bound.problem(name, coerced) if (bound := bound_of(top[name])) else None):
            problems.append(problem)
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
