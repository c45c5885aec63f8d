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
