"""vLLM for exported models, on a GPU: the same checks and timings as harness/serve.py
(llama.cpp), through vLLM's offline `LLM` engine on the exported transformers folder.

vLLM is not a dependency: `perf/served_speed.py --engine vllm` uses it when it is importable
and says so when it is not. Written against vLLM's documented offline API (LLM,
SamplingParams, TokensPrompt, `prompt_logprobs`); not yet run on a GPU from this project.
"""

from __future__ import annotations

import time

import numpy as np

from harness.serve import Timing, parity  # noqa: F401  (parity: the same comparison for both engines)

# f16 weights and f16 activations, KV cache and attention kernels: looser than llama.cpp's
# f16 (fp32 activations) until measured on a GPU.
LOGPROB_TOLERANCE = {"f32": 0.02, "f16": 0.05, "bf16": 0.1}


class VllmUnavailable(RuntimeError):
    pass


def engine_class():
    try:
        from vllm import LLM
    except ImportError:
        raise VllmUnavailable("vLLM is not importable here (pip install vllm, on a machine with a CUDA GPU)") from None
    return LLM


def version() -> str:
    import vllm

    return vllm.__version__


def load(hf_dir, dtype: str, n_models: int, max_len: int):
    """One engine per model, all resident at once so that timing rounds can interleave: each
    takes an equal share of 80% of the GPU's memory. Prefix caching is off, so a repeated
    prompt is prefilled again; CUDA graphs are on, as served."""
    return engine_class()(
        model=str(hf_dir),
        dtype={"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
        gpu_memory_utilization=0.8 / n_models,
        max_model_len=max_len,
        enable_prefix_caching=False,
        trust_remote_code=False,
        seed=0,
    )


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)


def _prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def token_logprobs(llm, ids: list[int]) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t, from vLLM's prompt log-probabilities (the
    entry for the prompt's own token is always returned, whatever its rank)."""
    out = llm.generate([_prompt(ids)], _params(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return np.array([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])


def greedy(llm, ids: list[int], n: int) -> list[int]:
    out = llm.generate([_prompt(ids)], _params(max_tokens=n), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids)


def _generate_s(llm, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate([_prompt(ids)], _params(max_tokens=new_tokens), use_tqdm=False)
    return time.perf_counter() - start


def time_once(llm, prompt: list[int], decode: list[int]) -> Timing:
    """One request at a time (batch 1, as llama.cpp is timed): prefill is a request for one new
    token after `prompt`; decode after the prompt is the extra time for len(decode) more
    tokens; decode from an empty context starts from a one-token prompt."""
    n = len(decode)
    first = _generate_s(llm, prompt, 1)
    after = _generate_s(llm, prompt, n + 1) - first
    empty = _generate_s(llm, decode[:1], n + 1) - _generate_s(llm, decode[:1], 1)
    return Timing(len(prompt) / first, n / after, n / empty)
