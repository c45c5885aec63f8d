"""Prefill throughput and decode latency, median of repeats after warm-up."""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from .config import LatencyConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _cache_keyword(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def measure_latency(model, input_ids: torch.Tensor, config: LatencyConfig, device: str) -> dict:
    """input_ids: (1, >= prefill_len) real text. Prefill = one forward over the prompt
    with a KV cache; decode = `decode_tokens` greedy steps after it."""
    model.eval()
    prompt = input_ids[:, :config.prefill_len].repeat(config.batch_size, 1).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") \
        else torch.autocast("cpu", enabled=False)

    def prefill():
        return model(input_ids=prompt, use_cache=True)

    cache_kw = _cache_keyword(model)

    def decode():
        out = model(input_ids=prompt, use_cache=True)
        past, token = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(config.decode_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_kw: past})
            past, token = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    with autocast:
        for _ in range(config.warmup):
            prefill()
            decode()
        prefill_s = statistics.median(_timed(prefill, device) for _ in range(config.repeats))
        decode_s = statistics.median(decode() for _ in range(config.repeats))
    return {"prefill_tokens_per_s": config.batch_size * prompt.shape[1] / prefill_s,
            "prefill_ms": prefill_s * 1e3,
            "decode_ms_per_token": decode_s / config.decode_tokens * 1e3,
            "batch_size": config.batch_size, "prefill_len": int(prompt.shape[1]),
            "decode_tokens": config.decode_tokens, "repeats": config.repeats, "device": device}
