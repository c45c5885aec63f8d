"""Mixtral: routed experts only (no shared expert, no attention biases)."""

from __future__ import annotations

from harness.export.target import TARGETS, Layer, Target, common_settings, routed


def config(source, n, k, width, shared):
    from transformers import MixtralConfig

    return MixtralConfig(
        **common_settings(source, n, k),
        intermediate_size=width,
        num_local_experts=n,
        sliding_window=None,
        router_jitter_noise=0.0,
    )


def tensors(i: int, layer: Layer, source) -> dict:
    return routed(f"model.layers.{i}.mlp.", "gate.weight", layer)


TARGETS.register("mixtral")(Target(config, tensors, shared="none", attention_bias=False))
