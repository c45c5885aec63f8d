"""What a stock MoE target is (`Target`), the tensors of one factorized FFN it takes (`Layer`),
and the helpers every target shares. Each target is one module in harness/export/targets/,
registering itself in TARGETS: its config, where each tensor goes, and what it refuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from factorllm_core.registry import Registry


@dataclass(frozen=True)
class Layer:
    """One factorized FFN, as tensors a stock MoE layer takes."""

    router: torch.Tensor  # (N, H), already scaled or zeroed as the mapping needs
    gate: torch.Tensor  # (N, W, H)
    up: torch.Tensor  # (N, W, H)
    down: torch.Tensor  # (N, H, W), the combine's constant folded in
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate (S, H), up (S, H), down (H, S)


def _no_refusals(source) -> list[str]:
    return []


@dataclass(frozen=True)
class Target:
    """A stock MoE class: its config from the source's, where each tensor goes, and what it
    cannot take beyond the common checks (harness/export/mapping.py)."""

    config: Callable  # (source config, N, K, W, S) -> transformers config
    tensors: Callable  # (layer index, Layer, source config) -> {state dict key: tensor}
    shared: str  # "none" | "optional" | "required": what it does with shared experts
    attention_bias: bool  # can carry the source's q/k/v biases
    gguf_problem: str | None = None  # why llama.cpp cannot run this class as exported, if it cannot
    refusals: Callable[..., list[str]] = _no_refusals  # (source config) -> why this class cannot take it


TARGETS: Registry[Target] = Registry("export architecture")


def common_settings(source, n_experts: int, top_k: int) -> dict:
    """The settings every target copies from the dense source."""
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return {k: getattr(source, k) for k in keys} | {
        "head_dim": head_dim(source),
        "num_experts_per_tok": top_k,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def head_dim(source) -> int:
    return getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads


def routed(prefix: str, router: str, layer: Layer) -> dict:
    """The router and the routed experts, gate and up fused, as transformers 5 stores them."""
    return {prefix + router: layer.router, prefix + "experts.gate_up_proj": torch.cat([layer.gate, layer.up], 1),
            prefix + "experts.down_proj": layer.down}  # fmt: skip


def has_qkv_bias(source) -> bool:
    return bool(getattr(source, "attention_bias", False)) or getattr(source, "model_type", "") == "qwen2"


def has_o_bias(source) -> bool:
    """Llama's attention_bias puts a bias on all four projections; Qwen2's o has none."""
    return getattr(source, "model_type", "") == "llama" and bool(getattr(source, "attention_bias", False))
