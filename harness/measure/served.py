"""Served latency of a trial's model in llama.cpp (`latency.engine: llama.cpp`).

The trial's saved weights (fp32, <trial dir>/model) are exported exactly to a stock MoE
class (harness/export.py) and converted to GGUF (f16) by llama.cpp's own converter; the
dense source model goes through the same converter once per model and is cached. Both are
timed in interleaved rounds, prefill of `latency.prefill_len` tokens in one batch and
`latency.decode_tokens` decode steps, with the trial's thread count. A model that cannot
be exported exactly gets no served numbers: the record says why.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
from pathlib import Path

import torch

SERVED_QUANT = "f16"


def served_latency(
    model_dir: Path,
    source,
    tokenizer,
    probe: torch.Tensor,
    prefill_len: int,
    decode_tokens: int,
    repeats: int,
    threads: int,
    cache_dir: str | Path | None,
) -> dict:
    """{"engine", "quant", "threads", per-round prefill/decode tokens/s of model and dense, and
    their per-round ratios}, or {"engine", "error"} when the model is not exportable."""
    from transformers import AutoModelForCausalLM

    from factorllm_core import load_trained_ffns
    from harness import serve
    from harness.assets.cache import default_cache_root
    from harness.export import NotExportable, to_stock

    out = {"engine": "llama.cpp", "quant": SERVED_QUANT, "threads": threads}
    dense_model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
    try:
        stock = to_stock(load_trained_ffns(dense_model, model_dir))
    except NotExportable as error:
        return out | {"error": str(error)}
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    key = hashlib.sha256(source.fingerprint.encode()).hexdigest()[:16]
    dense_gguf = root / "gguf" / f"{key}-{SERVED_QUANT}.gguf"
    if not dense_gguf.exists():  # converted once per source model
        dense_gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = dense_gguf.with_name(dense_gguf.name + ".tmp")
        serve.convert_to_gguf(source.location, SERVED_QUANT, tmp)
        tmp.replace(dense_gguf)
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        stock.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # the converter reads the vocabulary from the folder
        gguf = serve.convert_to_gguf(tmp, SERVED_QUANT)
        ids = probe.flatten().tolist()
        prompt, steps = ids[:prefill_len], ids[prefill_len : prefill_len + decode_tokens]
        contexts = {
            name: serve.load(path, threads, n_ctx=prefill_len + decode_tokens + 8)
            for name, path in (("model", gguf), ("dense", dense_gguf))
        }
        rounds = {name: [] for name in contexts}
        for llm in contexts.values():
            serve.time_once(llm, prompt[:32], steps[:4])  # warm-up
        for _ in range(repeats):
            for name, llm in contexts.items():
                rounds[name].append(serve.time_once(llm, prompt, steps))
        del contexts
    for name, timings in rounds.items():
        out[f"{name}_prefill_tokens_per_s_rounds"] = [t.prefill_tokens_per_s for t in timings]
        out[f"{name}_decode_tokens_per_s_rounds"] = [t.decode_tokens_per_s for t in timings]
    for phase in ("prefill", "decode"):
        out[f"{phase}_rounds"] = [
            m / d for m, d in zip(out[f"model_{phase}_tokens_per_s_rounds"], out[f"dense_{phase}_tokens_per_s_rounds"])
        ]
        out[phase] = statistics.median(out[f"{phase}_rounds"])
    return out
