"""Qwen2-MoE: routed experts with `norm_topk_prob`, and a shared expert behind a sigmoid gate,
written as zero (sigmoid(0) = 0.5, so the shared down projection is doubled). It always has
q/k/v biases (zeros for a Llama source) and never an o bias. transformers and vLLM run it
exactly; llama.cpp does not (gguf_problem)."""

from __future__ import annotations

import torch

from harness.export.target import TARGETS, Layer, Target, common_settings, has_o_bias, has_qkv_bias, head_dim, routed


def config(source, n, k, width, shared):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **common_settings(source, n, k),
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=n,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        use_sliding_window=False,
    )


def tensors(i: int, layer: Layer, source) -> dict:
    p = f"model.layers.{i}."
    out = routed(p + "mlp.", "gate.weight", layer)
    out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, source.hidden_size)  # sigmoid(0) = 0.5
    gate, up, down = (
        layer.shared
        if layer.shared is not None
        else (torch.zeros(0, source.hidden_size),) * 2 + (torch.zeros(source.hidden_size, 0),)
    )
    out |= {
        p + "mlp.shared_expert.gate_proj.weight": gate,
        p + "mlp.shared_expert.up_proj.weight": up,
        p + "mlp.shared_expert.down_proj.weight": 2 * down,
    }
    if not has_qkv_bias(source):  # a Llama source: the class always has q/k/v biases; zeros keep it exact
        kv = source.num_key_value_heads * head_dim(source)
        out |= {
            p + "self_attn.q_proj.bias": torch.zeros(source.num_attention_heads * head_dim(source)),
            p + "self_attn.k_proj.bias": torch.zeros(kv),
            p + "self_attn.v_proj.bias": torch.zeros(kv),
        }
    return out


def refusals(source) -> list[str]:
    if has_o_bias(source):
        return ["the source's o projection has a bias, which qwen2_moe lacks: use --arch granitemoeshared"]
    return []


TARGETS.register("qwen2_moe")(
    Target(
        config,
        tensors,
        shared="optional",
        attention_bias=True,
        refusals=refusals,
        gguf_problem="llama.cpp computes Qwen2-MoE's shared-expert gate as silu(x)/x (src/models/qwen2moe.cpp), "
        "0/0 = NaN at the zero gate this exact export writes: use --arch granitemoeshared for llama.cpp",
    )
)
