"""Served latency of a trial's model in llama.cpp (`latency.engine: llama.cpp`).

The trial's saved weights (fp32, <trial dir>/model) are exported exactly to a stock MoE
class (harness/export/write.py's `export`, with its checks against the factorized model) and
converted to GGUF (f16) by llama.cpp's own converter; the dense source model goes through
the same converter once per model into the locked, verified cache (harness/assets/cache.py). Both are
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
EXPORT_CHECK_TOKENS = 256  # probe tokens the export is checked on (logits, fp32) before it is timed


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
    from harness.assets.cache import default_cache_root, prepare_cached
    from harness.export import NotExportable, export

    out = {"engine": "llama.cpp", "quant": SERVED_QUANT, "threads": threads}
    factorized = load_trained_ffns(
        AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32), model_dir
    )
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    key = hashlib.sha256(source.fingerprint.encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        try:  # the same exact mapping and checks as python -m harness.export
            export(factorized, tokenizer, probe[:, :EXPORT_CHECK_TOKENS], Path(tmp) / "hf")
        except NotExportable as error:
            return out | {"error": str(error)}
        gguf = serve.convert_to_gguf(Path(tmp) / "hf", SERVED_QUANT)
        # the dense source through the same converter, once per model: locked and verified (harness/assets/cache.py)
        dense_gguf = (
            prepare_cached(
                root / "gguf" / f"{key}-{SERVED_QUANT}",
                lambda folder: serve.convert_to_gguf(source.location, SERVED_QUANT, folder / "model.gguf"),
            )
            / "model.gguf"
        )
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
