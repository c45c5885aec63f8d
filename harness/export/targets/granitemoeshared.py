"""GraniteMoeShared: routed experts plus an optional shared MLP of weight 1, and optional biases
on all four attention projections (a Qwen2 source's q/k/v biases, o's written as zero), which
llama.cpp's GraniteMoe loads and adds. Its multipliers are set to the identity."""

from __future__ import annotations

import math

import torch

from harness.export.target import TARGETS, Layer, Target, common_settings, has_o_bias, has_qkv_bias, head_dim, routed


def config(source, n, k, width, shared):
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(
        **common_settings(source, n, k),
        intermediate_size=width,
        num_local_experts=n,
        shared_intermediate_size=shared,
        attention_bias=has_qkv_bias(source),
        # identity multipliers; attention_multiplier replaces 1/sqrt(head_dim)
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_multiplier=1.0 / math.sqrt(head_dim(source)),
    )


def tensors(i: int, layer: Layer, source) -> dict:
    p = f"model.layers.{i}."
    out = routed(p + "block_sparse_moe.", "router.weight", layer)
    if layer.shared is not None:
        gate, up, down = layer.shared
        out |= {
            p + "shared_mlp.input_linear.weight": torch.cat([gate, up]),
            p + "shared_mlp.output_linear.weight": down,
        }
    if has_qkv_bias(source) and not has_o_bias(source):  # Qwen2: q/k/v biases, none on o (Granite's covers all four)
        out[p + "self_attn.o_proj.bias"] = torch.zeros(source.hidden_size)
    return out


TARGETS.register("granitemoeshared")(Target(config, tensors, shared="optional", attention_bias=True))
