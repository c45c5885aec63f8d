"""What a completed trial leaves behind, read back: its record, its trained model (the source
model with the kept trained layers, checked against the record), and its held-out text. Used by
`python -m harness.export`, perf/served_speed.py and anything else that takes a trial folder,
which can come from anyone: nothing read here decides whether code runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from factorllm_core import FactorConfig, load_trained_ffns
from factorllm_core.factorize import FACTOR_CONFIG_FILE
from reports.record import RECORD_FILE, read_record


class UnusableTrial(ValueError):
    """A trial folder that cannot be used as asked; the message says why and what to do."""


def trial_record(path: str | Path) -> dict:
    """The record of a completed factorized trial, from its folder or its record.json."""
    folder = trial_folder(path)
    record = read_record(folder / RECORD_FILE)
    if record is None:
        raise FileNotFoundError(f"{folder} holds no readable trial record ({RECORD_FILE})")
    if record["status"] != "completed" or record["config"].get("factor") is None:
        raise UnusableTrial(
            f"{folder}: only a completed factorized trial can be exported "
            f"(status {record['status']}, {record['setting']})"
        )
    if not isinstance(record.get("model"), dict) or not isinstance(record["model"].get("architecture"), str):
        raise UnusableTrial(f"{folder}: the record does not say which model it converted (model.architecture)")
    return record


def trial_folder(path: str | Path) -> Path:
    """A trial's folder, given the folder or its record.json."""
    path = Path(path)
    return path.parent if path.name == RECORD_FILE else path


def load_trial(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """(factorized model, tokenizer, record) of a completed trial, from its folder or record.
    Whether the source model's own code may run is the caller's to say (a command-line flag),
    never the record's: a trial folder can come from anyone."""
    from harness.assets.models import MODELS, config_json, load_model

    record = trial_record(path)
    folder = trial_folder(path)
    model_dir = folder / "model"
    if not (model_dir / "source.json").exists():
        raise FileNotFoundError(
            f"{model_dir} holds no trained weights (trials keep them since harness commit a3ff5f4, within record "
            f"schema 3): a completed record is never recomputed, so delete {folder / RECORD_FILE} and rerun the trial"
        )
    source = _checked_source(model_dir, record)
    if source["name"] not in MODELS and "auto_map" in config_json(source["name"]) and not trust_remote_code:
        raise UnusableTrial(
            f"the source model {source['name']!r} names its own code (auto_map in config.json), which would run "
            "to load it: pass --trust-remote-code if you trust it (the record's setting is not used)"
        )
    loaded = load_model(source["name"], dtype=torch.float32, device=device, trust_remote_code=trust_remote_code)
    if loaded.source.fingerprint != source["fingerprint"]:
        raise UnusableTrial(
            f"the source model {source['name']!r} changed since the trial "
            f"({loaded.source.fingerprint} against {source['fingerprint']})"
        )
    try:
        return load_trained_ffns(loaded.model, model_dir), loaded.tokenizer, record
    except (ValueError, RuntimeError, OSError, SafetensorError) as error:  # truncated, wrong shapes, ...
        raise UnusableTrial(f"{model_dir}: the trained layers do not load onto {source['name']!r}: {error}") from None


def _checked_source(model_dir: Path, record: dict) -> dict:
    """source.json and factor_config.json of a trial's kept weights, checked against its record:
    the same source model (name and fingerprint) and the same factor config."""
    try:
        source = json.loads((model_dir / "source.json").read_text())
        meta = json.loads((model_dir / FACTOR_CONFIG_FILE).read_text())
        saved = FactorConfig.from_dict(meta["factor_config"])
        if not (isinstance(source, dict) and isinstance(source.get("name"), str) and source.get("fingerprint")):
            raise ValueError("source.json needs the model's name and fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UnusableTrial(f"{model_dir}: unreadable or incomplete kept weights ({error})") from None
    claimed = FactorConfig.from_dict(record["config"]["factor"])
    if saved != claimed:
        raise UnusableTrial(f"{model_dir} holds {saved.name} layers, but the record says {claimed.name}: not exported")
    wanted = (record["config"].get("model"), (record.get("model") or {}).get("fingerprint"))
    if (source["name"], source["fingerprint"]) != wanted:
        raise UnusableTrial(
            f"{model_dir}/source.json names {source['name']!r} ({source['fingerprint']}), but the record was trained "
            f"from {wanted[0]!r} ({wanted[1]}): not exported"
        )
    return source


def heldout_ids(tokenizer, record: dict, max_len: int, sequences: int | None = 2) -> torch.Tensor:
    """The trial's own held-out text, its first `sequences` sequences (None: all): what the
    export is checked on."""
    from harness.config import EvalConfig, build_section
    from harness.eval.heldout import as_batch, heldout_sequences

    ev, _ = build_section(EvalConfig, record["config"]["eval"] | {"tasks": "all"}, "eval")
    return as_batch(heldout_sequences(tokenizer, ev, max_len), sequences)
