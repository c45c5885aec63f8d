"""llama.cpp on exported models (the FACTORLLM_SERVE=1 extra): skipped without it, with the reason.
Slow: it converts the packaged SmolLM2-135M (run with -m slow)."""

import pytest
import torch

from harness import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    pytest.importorskip("llama_cpp", reason="the llama.cpp extra is not installed (FACTORLLM_SERVE=1 bash install.sh)")
    try:
        serve.llama_cpp_source()
    except serve.ServeUnavailable as error:
        pytest.skip(str(error))


# K = N (the dense model) at f32 and f16, with greedy continuations; K = 1 `unscaled` at f32: each
# chosen expert must weigh exactly 1, which holds in llama.cpp only if it renormalises the top-K
# weights (without, the weight would be p < 1). Untrained routers are near-uniform: at f16 (and in
# greedy decoding of a quarter-width FFN) rounding flips near-tied choices on many tokens, so the
# K < N cases at f16 are checked on trained models (perf/served_speed.py).
DENSE, QUARTER = {"n_experts": 4, "top_k": 4, "combine": "scaled"}, {"n_experts": 4, "top_k": 1, "combine": "unscaled"}


@pytest.mark.parametrize("factor,quant", [(DENSE, "f32"), (DENSE, "f16"), (QUARTER, "f32")])
def test_llama_cpp_computes_what_transformers_computes(llama_cpp, tmp_path, factor, quant):
    """The export in llama.cpp (f16) against transformers (fp32): per-token log-probabilities within
    the f16 tolerance, and the same greedy continuations."""
    from transformers import AutoModelForCausalLM

    from factorllm_core import FactorConfig, factorize
    from harness.assets.models import load_model
    from harness.export import export

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    factorize(loaded.model, FactorConfig(**factor, router_bias=False))
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"][:64])
    export(loaded.model, loaded.tokenizer, ids[None], tmp_path / "hf")
    gguf = serve.convert_to_gguf(tmp_path / "hf", quant)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0].log_softmax(-1)[torch.arange(63), ids[1:]].double()
    llm = serve.load(gguf, threads=2, n_ctx=256, logits_all=True)
    ours = torch.tensor(serve.token_logprobs(llm, ids.tolist()))
    check = serve.parity(ours.numpy(), theirs.numpy())
    assert check["median_abs_logprob_diff"] < serve.LOGPROB_TOLERANCE[quant], check
    if quant == "f32":  # the computation itself: no token may choose another expert
        assert check["max_abs_logprob_diff"] < 0.1, check
    prompt = loaded.tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    if factor is DENSE:
        assert serve.greedy(llm, prompt, 8) == expected


@pytest.mark.parametrize("factor", [{"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "unscaled"}, QUARTER])
def test_a_qwen2_source_exported_to_granite_runs_in_llama_cpp(llama_cpp, tmp_path, factor):
    """Qwen2's q/k/v biases ride as Granite's attention biases: llama.cpp's converter must permute
    them with the q/k weights for its rope layout. A tiny Qwen2 with random biases (so that a
    dropped or unpermuted bias shows), SmolLM2's tokenizer (one the converter knows), f32."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from factorllm_core import FactorConfig, calibrate, factorize
    from harness.assets.models import resolve_source
    from harness.export import export

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m").location)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("_proj.bias"):
            parameter.data.normal_(std=0.5)
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:64])
    config = FactorConfig(**factor, router_bias=False)
    factorize(model, config, calibrate(model, [ids], "cpu") if config.needs_calibration else None)
    check = export(model, tokenizer, ids[None], tmp_path / "hf")
    assert check["class"] == "GraniteMoeSharedForCausalLM" and check["exact"]
    llm = serve.load(serve.convert_to_gguf(tmp_path / "hf", "f32"), threads=2, n_ctx=256, logits_all=True, kv_f32=True)
    with torch.no_grad():
        theirs = model(ids[None]).logits[0].log_softmax(-1)[torch.arange(63), ids[1:]].double()
    parity = serve.parity(serve.token_logprobs(llm, ids.tolist()), theirs.numpy())
    assert parity["max_abs_logprob_diff"] < 1e-3, parity
