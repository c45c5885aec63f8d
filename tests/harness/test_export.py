"""Export to stock transformers MoE classes: exact where the mapping is exact (K = N and shared
experts included), refused in one line where it is not, and loadable without custom code."""

import json

import pytest
import sweep_assets
import torch
from transformers import AutoModelForCausalLM

from factorllm_core import FactorConfig, calibrate, factorize
from harness.export import NotExportable, compare, export, to_stock

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def factorized(tiny_model_factory, family="llama", **factor):
    model = tiny_model_factory(family)
    dense = tiny_model_factory(family)
    config = FactorConfig(**({"n_experts": 4, "top_k": 2, "router_bias": False} | factor))
    calibration = None
    if config.needs_calibration:
        sequences = [torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
        calibration = calibrate(model, sequences, "cpu")
    factorize(model, config, calibration)
    return model.eval(), dense.eval()


EXACT = [
    ("llama", "mixtral", {"combine": "weighted"}),
    ("llama", "mixtral", {"combine": "weighted", "top_k": 3}),
    ("llama", "mixtral", {"combine": "weighted", "top_k": 4}),
    ("llama", "mixtral", {"combine": "scaled", "top_k": 1}),
    ("llama", "mixtral", {"combine": "unscaled", "top_k": 1, "partition": "random"}),
    ("llama", "granitemoeshared", {"combine": "weighted", "top_k": 1}),
    ("llama", "granitemoeshared", {"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "unscaled"}),
    ("llama", "qwen2_moe", {"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "unscaled"}),
    ("llama", "qwen2_moe", {"combine": "weighted"}),  # no shared expert: a zero-width one
    ("qwen2", "qwen2_moe", {"combine": "weighted"}),
    ("qwen2", "qwen2_moe", {"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "scaled"}),
    ("qwen2", "granitemoeshared", {"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "unscaled"}),
    ("qwen2", "granitemoeshared", {"combine": "weighted"}),  # no shared expert: no shared MLP
    ("qwen2", "granitemoeshared", {"combine": "scaled", "top_k": 1}),
]


@pytest.mark.parametrize("family,arch,factor", EXACT)
def test_exact_mappings_match_the_factorized_model(tiny_model_factory, tmp_path, word_tokenizer, family, arch, factor):
    model, _ = factorized(tiny_model_factory, family, **factor)
    check = export(model, word_tokenizer(["a b c"]), IDS, tmp_path / "out", arch)
    assert check["exact"] and check["max_abs_logit_diff"] < 1e-4 and check["reloaded_max_abs_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)
    assert type(stock).__module__.startswith("transformers.models.")
    routed = model.model.layers[0].mlp.router
    assert routed.top_k == factor.get("top_k", 2)


@pytest.mark.parametrize(
    "family,arch",
    [("llama", "mixtral"), ("llama", "granitemoeshared"), ("qwen2", "qwen2_moe"), ("qwen2", "granitemoeshared")],
)
@pytest.mark.parametrize("combine", ["scaled", "unscaled"])  # `weighted` at K = N is not dense (p x N): in EXACT
def test_k_equal_n_exports_the_dense_model(tiny_model_factory, family, arch, combine):
    model, dense = factorized(tiny_model_factory, family, top_k=4, combine=combine)
    assert compare(dense, to_stock(model, arch), IDS)["max_abs_logit_diff"] < 1e-4


REFUSED = [
    ("llama", "auto", {"router_bias": True}, "factor.router_bias: false"),
    ("llama", "auto", {"n_routers": 2, "combine": "weighted"}, "use n_routers: 1"),
    ("llama", "auto", {"combine": "mean_comp", "partition": "coact"}, "use combine unscaled"),
    ("llama", "auto", {"combine": "scaled"}, "use combine weighted, or --approximate"),
    ("llama", "auto", {"router_mode": "random", "combine": "weighted"}, "no router to export"),
    ("llama", "mixtral", {"n_experts": 3, "top_k": 1, "n_shared": 1}, "use --arch granitemoeshared or qwen2_moe"),
    ("qwen2", "mixtral", {"combine": "weighted"}, "use --arch granitemoeshared"),
    ("gemma3", "auto", {"combine": "weighted"}, "Gemma3 and others have no stock MoE counterpart"),
]


@pytest.mark.parametrize("family,arch,factor,message", REFUSED)
def test_what_cannot_be_exact_is_refused_with_what_would_make_it_exportable(
    tiny_model_factory, family, arch, factor, message
):
    model, _ = factorized(tiny_model_factory, family, **factor)
    with pytest.raises(NotExportable, match=message) as refused:
        to_stock(model, arch)
    assert "\n" not in str(refused.value)


def test_approximate_mode_exports_a_constant_combine_and_measures_its_error(
    tiny_model_factory, tmp_path, word_tokenizer
):
    model, _ = factorized(tiny_model_factory, combine="scaled")  # 1R4E2K, the paper's combine
    check = export(model, word_tokenizer(["a b c"]), IDS, tmp_path / "out", approximate=True)
    assert not check["exact"] and check["tolerance"] is None
    assert 0 < check["max_abs_logit_diff"] < 0.5 and 0 <= check["mean_kl"] < 1e-2
    saved = json.loads((tmp_path / "out" / "factorllm_export.json").read_text())
    assert saved["max_abs_logit_diff"] == check["max_abs_logit_diff"]


def test_the_command_exports_a_trained_trial_and_refuses_in_one_line(tmp_path, cache_dir, capsys):

    from harness.config import TrialConfig
    from harness.export import main
    from harness.trial import Trial

    common = sweep_assets.trial_config(tmp_path) | {"latency": {"enabled": False}}
    trained = TrialConfig.from_dict(
        common | {"factor": {"n_experts": 4, "top_k": 2, "combine": "weighted", "router_bias": False}}
    )
    record = Trial(trained, tmp_path / "runs").run()
    assert record["status"] == "completed", record["error"]
    folder = tmp_path / "runs" / trained.trial_id
    assert main([str(folder / "record.json"), "--out", str(tmp_path / "hf")]) == 0
    assert "MixtralForCausalLM, exact" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()

    biased = TrialConfig.from_dict(common | {"factor": {"n_experts": 4, "top_k": 2, "combine": "weighted"}})
    Trial(biased, tmp_path / "runs").run()
    assert main([str(tmp_path / "runs" / biased.trial_id), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train with factor.router_bias: false" in err[0]
    assert main([str(folder), "--out", str(tmp_path / "hf")]) == 2  # not an empty folder
    capsys.readouterr()
    # Qwen2-MoE runs in transformers, but llama.cpp's silu(x)/x gate is NaN at its exact zero gate
    gguf = [str(folder), "--out", str(tmp_path / "gguf"), "--arch", "qwen2_moe", "--format", "gguf"]
    assert main(gguf) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "silu(x)/x" in err[0] and "use --arch granitemoeshared" in err[0]
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("n_shared", [0, 1])
def test_a_qwen2_source_goes_to_granite_which_llama_cpp_runs(n_shared):
    from harness.export import gguf_problem, pick_arch

    factor = FactorConfig(n_experts=4 - n_shared, top_k=1, n_shared=n_shared, router_bias=False)
    arch = pick_arch("auto", factor, "Qwen2ForCausalLM")
    assert arch == "granitemoeshared" and gguf_problem(arch) is None
    assert pick_arch("auto", factor, "LlamaForCausalLM") == ("granitemoeshared" if n_shared else "mixtral")


def test_a_trial_asked_for_served_latency_says_why_a_model_is_not_exportable(tmp_path, cache_dir):
    """latency.engine: llama.cpp on a biased router: no served numbers, and the reason, without llama.cpp."""

    from harness.config import ConfigError, TrialConfig
    from harness.trial import Trial

    config = sweep_assets.trial_config(tmp_path, data_budget_tokens=200) | {
        "factor": {"n_experts": 4, "top_k": 2, "combine": "weighted"},
        "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1, "warmup": 0, "engine": "llama.cpp"},
    }
    trial = TrialConfig.from_dict(config)
    eager = TrialConfig.from_dict(config | {"latency": config["latency"] | {"engine": "eager"}})
    assert trial.trial_id != eager.trial_id
    assert (
        eager.trial_id
        == TrialConfig.from_dict(
            config | {"latency": {k: v for k, v in config["latency"].items() if k != "engine"}}
        ).trial_id
    )
    record = Trial(trial, tmp_path / "runs").run()
    assert record["status"] == "completed", record["error"]
    assert "router_bias: false" in record["served"]["error"] and "prefill" not in record["served"]
    with pytest.raises(ConfigError, match="latency.engine: 'vllm' must be one of eager, llama.cpp"):
        TrialConfig.from_dict(config | {"latency": {"engine": "vllm"}})


def test_a_wrong_mapping_is_caught_before_anything_is_written(
    tiny_model_factory, tmp_path, word_tokenizer, monkeypatch
):
    """The check can fail: forgetting to fold N into the down projections is refused."""
    from harness import export as export_module

    model, _ = factorized(tiny_model_factory, combine="weighted")
    right = export_module.layer_tensors

    def forgets_n(ffn, factor, approximate):
        layer = right(ffn, factor, approximate)
        return export_module.Layer(layer.router, layer.gate, layer.up, layer.down / factor.n_experts, layer.shared)

    monkeypatch.setattr("harness.export.mapping.layer_tensors", forgets_n)
    with pytest.raises(RuntimeError, match="a bug in the mapping, nothing written"):
        export(model, word_tokenizer(["a b c"]), IDS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_rounding_floor_restores_each_layers_dispatch_even_when_a_forward_fails(tiny_model_factory, monkeypatch):
    """Review bug 7: the dispatch paths were switched without try/finally."""
    from factorllm_core import factorized_layers
    from harness.export import rounding_floor

    model, _ = factorized(tiny_model_factory, combine="weighted")
    layers = [layer for _, layer in factorized_layers(model)]
    layers[0].experts.dispatch, layers[1].experts.dispatch = "grouped", "reference"
    calls = []

    def failing_second_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) > len(layers):  # the "sorted" pass
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    original = type(layers[0]).forward
    monkeypatch.setattr(type(layers[0]), "forward", lambda self, *a, **k: failing_second_pass(self, *a, **k))
    with pytest.raises(RuntimeError, match="out of memory"):
        rounding_floor(model, IDS)
    assert [layer.experts.dispatch for layer in layers] == ["grouped", "reference"]


def test_a_llama_source_with_attention_biases_goes_to_granite_with_all_four(tmp_path, word_tokenizer):
    """Review bug 6: it was sent to qwen2_moe (no o bias) and failed with a traceback; Granite carries
    q, k, v and o biases, the o bias the source's own (not the zero written for Qwen2)."""
    from conftest import TINY, with_attention_biases
    from transformers import LlamaConfig, LlamaForCausalLM

    def biased():
        torch.manual_seed(0)
        return with_attention_biases(LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True))).eval()

    model, config = biased(), FactorConfig(n_experts=4, top_k=2, combine="weighted", router_bias=False)
    factorize(model, config)
    for arch in ("auto", "qwen2_moe"):
        with pytest.raises(NotExportable, match="use --arch granitemoeshared"):
            to_stock(model, arch)
    check = export(model, word_tokenizer(["a b c"]), IDS, tmp_path / "out", "granitemoeshared")
    assert check["exact"] and check["max_abs_logit_diff"] < 1e-4


def test_a_record_without_kept_weights_says_how_to_get_them(tmp_path, cache_dir, capsys):
    """Review bug 10: the message named the wrong schema and said "rerun the trial", which does
    nothing while the completed record is there."""
    from harness.config import TrialConfig
    from harness.export import main
    from harness.trial import Trial

    factor = {"n_experts": 4, "top_k": 2, "combine": "weighted", "router_bias": False}
    config = TrialConfig.from_dict(
        sweep_assets.trial_config(tmp_path) | {"latency": {"enabled": False}, "factor": factor}
    )
    assert Trial(config, tmp_path / "runs").run()["status"] == "completed"
    folder = tmp_path / "runs" / config.trial_id
    (folder / "model" / "source.json").unlink()  # as in a record from before weights were kept
    assert main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"delete {folder / 'record.json'} and rerun the trial" in err and "since schema 3" not in err
