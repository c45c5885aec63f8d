"""Trial configuration, one module per job:

    yaml_io.py       reading a grid or trial file safely (size, nesting, duplicate keys)
    fields.py        from a mapping to a section: types, declared bounds, path-like strings
    sections.py      train / eval / flops / latency sections, each field's bound and id rule
                     declared beside its default
    trial_config.py  TrialConfig (a model, a FactorLLM setting or null, the sections) and the
                     options that define a variant
    identity.py      the trial id: which fields count, as the fields declare

A trial YAML holds the sections; unknown keys, wrong types and bad values are errors that name
the field (`train.seq_len`), the value and what is allowed. The names below are the package's
interface (`from harness.config import TrialConfig`).
"""

from harness.config.fields import CONTEXT, ConfigError, build_section, path_text_problem, short
from harness.config.sections import ENGINES, LEARNING_RATE, EvalConfig, FlopsConfig, LatencyConfig, TrainConfig
from harness.config.trial_config import (
    DEVICE,
    OPTION_CLASSES,
    PRECISIONS,
    SECTIONS,
    TrialConfig,
    axis_options,
    options,
    parse_trial,
    resolve_precision,
    trainable_dispatch,
)
from harness.config.yaml_io import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml, read_config_text

__all__ = [
    "CONTEXT",
    "DEVICE",
    "ENGINES",
    "LEARNING_RATE",
    "MAX_CONFIG_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "OPTION_CLASSES",
    "PRECISIONS",
    "SECTIONS",
    "ConfigError",
    "EvalConfig",
    "FlopsConfig",
    "LatencyConfig",
    "TrainConfig",
    "TrialConfig",
    "axis_options",
    "build_section",
    "load_yaml",
    "options",
    "parse_trial",
    "path_text_problem",
    "read_config_text",
    "resolve_precision",
    "short",
    "trainable_dispatch",
]
