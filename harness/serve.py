"""llama.cpp for exported models: GGUF conversion with llama.cpp's own converter, parity
with transformers, and served speed. An optional extra: `FACTORLLM_SERVE=1 bash install.sh`
builds llama-cpp-python from its source package and keeps that package's vendored
llama.cpp (its `convert_hf_to_gguf.py` and gguf-py) under `.venv/src/`.

Facts this module relies on, read in the vendored llama.cpp (0.3.36's): Mixtral
(`src/models/llama.cpp`) and GraniteMoe/GraniteMoeShared (`src/models/granite.cpp`) call
`build_moe_ffn` with `norm_w = true` and softmax gating, so the top-K weights are
renormalised, as in transformers. `parity` checks it on every export all the same.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"
GGML_TYPE_F32 = 0  # ggml's type id
SOURCE_ENV = "FACTORLLM_LLAMA_CPP_SRC"  # a llama.cpp source tree, to use instead of the one install.sh kept
INSTALL_HINT = "FACTORLLM_SERVE=1 bash install.sh (builds llama-cpp-python from source, ~10 min on 2 cores)"
# Parity of per-token log-probabilities, llama.cpp against transformers (fp32) on held-out
# text: the median absolute difference over tokens, by GGUF tensor type (f32 weights: the
# computation itself, with llama.cpp's f16 KV cache; f16 rounds each weight to 11 bits, q8_0
# to 8 bits per 32-weight block). The median, because a routed model has near-ties: where two
# experts' router probabilities differ by less than the rounding, the engines may choose
# differently, and that token's log-probability moves by far more (`parity` reports the share
# of such tokens, > 0.1 nats, and the max beside the median).
# Parity is checked with an f32 KV cache, so that it measures the weights' tensor type and the
# engine: with llama.cpp's default f16 cache, a model that amplifies small differences (the
# paper's x N/K recipe: measured on a trained 1R4E1K, median 0.41 nats at f32 weights with an f16
# cache, 3e-5 with an f32 one) drifts from transformers by more than its weights explain.
LOGPROB_TOLERANCE = {"f32": 0.02, "f16": 0.02, "q8_0": 0.05}


def parity(ours, theirs) -> dict:
    """llama.cpp's per-token log-probabilities (`ours`) against transformers' (`theirs`)."""
    diff = np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64))
    return {
        "median_abs_logprob_diff": float(np.median(diff)),
        "mean_abs_logprob_diff": float(diff.mean()),
        "max_abs_logprob_diff": float(diff.max()),
        "share_above_0.1": float((diff > 0.1).mean()),
        "tokens": int(diff.size),
    }


class ServeUnavailable(RuntimeError):
    """The llama.cpp extra is not installed; the message says how to install it."""


def llama_cpp_source() -> Path:
    """The vendored llama.cpp tree: $FACTORLLM_LLAMA_CPP_SRC, else the one install.sh kept."""
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV])
    venv = Path(sys.prefix)
    found = sorted(glob.glob(str(venv / "src" / "llama_cpp_python-*/vendor/llama.cpp")))
    if not found:
        raise ServeUnavailable(f"llama.cpp's converter is not installed: {INSTALL_HINT}")
    return Path(found[-1])


def unavailable() -> str | None:
    """Why llama.cpp cannot serve here (the extra is missing), or None; finds, imports nothing."""
    import importlib.util

    try:
        llama_cpp_source()
    except ServeUnavailable as error:
        return str(error)
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    return None


def llama_class():
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ServeUnavailable(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return Llama


def convert_to_gguf(hf_dir: str | Path, quant: str = "f16", out: str | Path | None = None) -> Path:
    """llama.cpp's own `convert_hf_to_gguf.py` on a transformers folder; returns the GGUF path."""
    source = llama_cpp_source()
    hf_dir = Path(hf_dir)
    out = Path(out) if out else hf_dir / f"model-{quant}.gguf"
    env = os.environ | {"PYTHONPATH": str(source / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [
        sys.executable,
        str(source / "convert_hf_to_gguf.py"),
        str(hf_dir),
        "--outfile",
        str(out),
        "--outtype",
        quant,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}: {' | '.join(tail)}")
    log.debug("%s", result.stderr)
    return out


def load(gguf: str | Path, threads: int, n_ctx: int = 1024, logits_all: bool = False, kv_f32: bool = False):
    """A llama.cpp context on `gguf`, CPU only, `threads` threads for prefill and decode alike.
    The KV cache is llama.cpp's default f16 (what is served and timed) unless `kv_f32`."""
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
    return llama_class()(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         n_gpu_layers=0, logits_all=logits_all, verbose=False, seed=0, **kv)  # fmt: skip


def token_logprobs(llm, ids: list[int]) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t, from llama.cpp's logits."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def greedy(llm, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` (argmax of llama.cpp's logits: no sampler involved)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@dataclass
class Timing:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # after the prompt: each step attends over len(prompt)+ tokens
    decode_empty_tokens_per_s: float  # from an empty context, as llama-bench's tg test


def time_once(llm, prompt: list[int], decode: list[int]) -> Timing:
    """Decode `decode` one token at a time from an empty context; then prefill `prompt` in one
    batch and decode `decode` again after it (teacher-forced: the cost of a step does not
    depend on which token it is)."""
    llm.reset()
    empty = _decode(llm, decode)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    return Timing(len(prompt) / prefill, len(decode) / _decode(llm, decode), len(decode) / empty)


def _decode(llm, tokens: list[int]) -> float:
    start = time.perf_counter()
    for token in tokens:
        llm.eval([token])
    return time.perf_counter() - start
