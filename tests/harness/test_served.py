"""latency.engine: llama.cpp as a trial meets it, without llama.cpp itself (review bugs 3 and 4):
refused at validation when the extra is missing; a failure there keeps the trial's other results;
the dense GGUF is cached once, locked and verified; only an export checked exact is timed."""

import pytest
import sweep_assets
import torch

from harness import serve
from harness.config import ConfigError, TrialConfig
from harness.grid import expand_grid
from harness.serve import Timing
from harness.trial import Trial

FACTOR = {"n_experts": 4, "top_k": 2, "combine": "weighted", "router_bias": False}
LATENCY = {"prefill_len": 8, "decode_tokens": 2, "repeats": 1, "warmup": 0, "engine": "llama.cpp"}


def test_the_engine_without_the_extra_is_refused_at_validation(monkeypatch):
    monkeypatch.setattr(serve, "unavailable", lambda: f"llama-cpp-python is not installed: {serve.INSTALL_HINT}")
    grid = {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}, "latency": {"engine": "llama.cpp"}}
    with pytest.raises(ConfigError) as error:
        expand_grid(grid)
    assert error.value.problems == [
        f"latency.engine: llama.cpp, but llama-cpp-python is not installed: {serve.INSTALL_HINT}"
    ]
    expand_grid(grid | {"latency": {"engine": "eager"}})  # the default engine needs nothing


def trial(tmp_path):
    config = sweep_assets.trial_config(tmp_path, data_budget_tokens=200) | {"factor": FACTOR, "latency": LATENCY}
    return TrialConfig.from_dict(config)


def test_a_served_failure_keeps_the_trials_other_results(tmp_path, cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("llama.cpp crashed")

    monkeypatch.setattr("harness.trial.served_latency", broken)
    record = Trial(trial(tmp_path), tmp_path / "runs").run()
    assert record["status"] == "completed", record["error"]
    assert record["served"] == {"engine": "llama.cpp", "error": "RuntimeError: llama.cpp crashed"}
    assert record["heldout"]["loss"] > 0 and record["speedup"]["decode"] > 0 and record["training"]["steps"] > 0


class FakeEngine:
    """serve's conversion, loading and timing, recorded instead of run."""

    def __init__(self, monkeypatch):
        self.converted, self.loaded = [], []
        monkeypatch.setattr(serve, "convert_to_gguf", self.convert)
        monkeypatch.setattr(serve, "load", lambda path, threads, n_ctx: self.loaded.append(str(path)) or path)
        monkeypatch.setattr(serve, "time_once", lambda llm, prompt, steps: Timing(100.0, 10.0, 10.0))

    def convert(self, hf_dir, quant="f16", out=None):
        out = out or (hf_dir / f"model-{quant}.gguf")
        out.write_bytes(b"GGUF" + str(hf_dir).encode())
        self.converted.append(str(hf_dir))
        return out


def test_the_dense_gguf_is_converted_once_into_a_verified_cache(tmp_path, cache_dir, monkeypatch):
    engine, config = FakeEngine(monkeypatch), trial(tmp_path)
    first = Trial(config, tmp_path / "a").run()
    second = Trial(config, tmp_path / "b").run()
    assert first["served"]["decode"] == second["served"]["decode"] == 1.0, (first["served"], second["served"])
    dense = [c for c in engine.converted if c.endswith("ckpt")]
    assert len(dense) == 1  # the source model: once for both trials
    (cached,) = (cache_dir / "gguf").glob("*-f16")
    assert (cached / "MANIFEST.json").exists() and (cached / "model.gguf").exists()


def test_an_export_that_fails_its_check_is_not_timed(tmp_path, cache_dir, monkeypatch):
    from harness import export as export_module

    engine = FakeEngine(monkeypatch)
    right = export_module.layer_tensors

    def forgets_n(ffn, factor, approximate):  # a wrong mapping: N not folded into the down projections
        layer = right(ffn, factor, approximate)
        return export_module.Layer(layer.router, layer.gate, layer.up, layer.down / factor.n_experts, layer.shared)

    monkeypatch.setattr("harness.export.mapping.layer_tensors", forgets_n)
    record = Trial(trial(tmp_path), tmp_path / "runs").run()
    assert record["status"] == "completed" and "a bug in the mapping" in record["served"]["error"]
    assert engine.loaded == []
    assert torch.isfinite(torch.tensor(record["heldout"]["loss"]))
