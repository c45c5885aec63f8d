"""Latency timing: which dispatch path the factorized model runs while timed."""

import copy

import pytest

from factorllm_core import FactorConfig, defactorize, factorize, factorized_layers
from harness.config import LatencyConfig
from harness.measure.latency import measure_latency

FAST = dict(prefill_len=8, decode_tokens=2, repeats=1, warmup=0)


@pytest.fixture
def models(tiny_model_factory):
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    return {"model": model, "dense": defactorize(copy.deepcopy(model))}


@pytest.mark.parametrize("dispatch,ran", [("auto", ["sorted"]), ("reference", ["reference"]), ("grouped", ["grouped"])])
def test_the_factorized_model_is_timed_with_the_chosen_dispatch(models, token_ids, dispatch, ran):
    result = measure_latency(models, token_ids, LatencyConfig(dispatch=dispatch, **FAST), "cpu")
    assert result["model"]["dispatch"] == ran  # `auto` on CPU resolves to sorted
    assert result["dense"]["dispatch"] is None  # no experts there
    assert result["model"]["prefill_tokens_per_s"] > 0
    assert all(layer.experts.dispatch == "auto" for _, layer in factorized_layers(models["model"]))  # restored


def test_dispatch_is_restored_when_timing_fails(models, token_ids):
    layers = factorized_layers(models["model"])
    layers[0][1].experts.dispatch = "reference"
    with pytest.raises(RuntimeError, match="fused.* needs a CUDA device"):  # refused before any change sticks
        measure_latency(models, token_ids, LatencyConfig(dispatch="fused", **FAST), "cpu")
    assert [layer.experts.dispatch for _, layer in layers] == ["reference"] + ["auto"] * (len(layers) - 1)
