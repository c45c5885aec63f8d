"""Prefill throughput and decode latency, median of repeats after warm-up.

Several models are timed interleaved (each repeat runs every model in turn), so a
speedup is a ratio of times taken in the same window: load on the machine hits
both sides alike instead of whichever happened to run later.
"""

from __future__ import annotations

import inspect
import statistics
import time
from contextlib import ExitStack

import torch

from factorllm_core import factorized_layers, use_dispatch
from harness.config import LatencyConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cache_keyword(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Runner:
    """Times one model: a prefill over the prompt, and greedy decode steps after it."""

    def __init__(self, model, prompt: torch.Tensor, config: LatencyConfig, device: str):
        self.model, self.prompt, self.config, self.device = model.eval(), prompt, config, device
        self.cache_kw = _cache_keyword(model)

    def prefill(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.model(input_ids=self.prompt, use_cache=True)
        _sync(self.device)
        return time.perf_counter() - start

    def decode(self) -> float:
        out = self.model(input_ids=self.prompt, use_cache=True)
        past, token = getattr(out, self.cache_kw), out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.config.decode_tokens):
            out = self.model(input_ids=token, use_cache=True, **{self.cache_kw: past})
            past, token = getattr(out, self.cache_kw), out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return time.perf_counter() - start


@torch.no_grad()
def measure_latency(models: dict, input_ids: torch.Tensor, config: LatencyConfig, device: str) -> dict:
    """models: {name: model}; input_ids: (1, >= prefill_len) real text -> {name: result}.
    Factorized models dispatch with `config.dispatch` while timed."""
    prompt = input_ids[:, : config.prefill_len].repeat(config.batch_size, 1).to(device)
    runners = {name: _Runner(model, prompt, config, device) for name, model in models.items()}
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    prefill = {name: [] for name in runners}
    decode = {name: [] for name in runners}
    with ExitStack() as stack:
        for model in models.values():
            stack.enter_context(use_dispatch(model, config.dispatch))
        stack.enter_context(autocast)
        for repeat in range(config.warmup + config.repeats):
            for name, runner in runners.items():
                p, d = runner.prefill(), runner.decode()
                if repeat >= config.warmup:
                    prefill[name].append(p)
                    decode[name].append(d)
    return {
        name: _result(prefill[name], decode[name], prompt, config, device, _dispatch_used(models[name]))
        for name in runners
    }


def _dispatch_used(model) -> list[str] | None:
    """The paths the factorized layers' experts ran in the last timed call (`auto`
    resolved); None for a model without factorized layers."""
    layers = factorized_layers(model)
    return sorted({layer.experts.last_dispatch for _, layer in layers}) if layers else None


def _result(
    prefill_rounds: list[float],
    decode_rounds: list[float],
    prompt: torch.Tensor,
    config: LatencyConfig,
    device: str,
    dispatch: list[str] | None,
) -> dict:
    """Medians, and every round's time (rounds are interleaved across models, so
    round i of two models can be paired for a per-round ratio)."""
    prefill_s, decode_s = statistics.median(prefill_rounds), statistics.median(decode_rounds)
    return {
        "prefill_tokens_per_s": prompt.numel() / prefill_s,
        "prefill_ms": prefill_s * 1e3,
        "decode_ms_per_token": decode_s / config.decode_tokens * 1e3,
        "prefill_ms_rounds": [t * 1e3 for t in prefill_rounds],
        "decode_ms_per_token_rounds": [t / config.decode_tokens * 1e3 for t in decode_rounds],
        "batch_size": config.batch_size,
        "prefill_len": int(prompt.shape[1]),
        "decode_tokens": config.decode_tokens,
        "repeats": config.repeats,
        "device": device,
        "interleaved": True,
        "dispatch": dispatch,
    }
