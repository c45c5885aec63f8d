"""From a factorized model to a stock MoE model in memory: which target (`pick_arch`), what
refuses it (`factor_problems` from the factor config alone, `source_problems` from the dense
source), and the mapping itself (`layer_tensors`, `to_stock`). See harness/export/__init__.py
for when the mapping is exact."""

from __future__ import annotations

import torch
from torch import nn

from factorllm_core import COMBINES, FactorConfig, factorized_layers
from harness.export import targets  # noqa: F401  (registers every target class)
from harness.export.target import TARGETS, Layer, has_qkv_bias

APPROXIMATE_ROUTER_SCALE = 2.0**-10  # a power of two: scaling keeps every logit's order exactly


class NotExportable(ValueError):
    """The model cannot be written as the asked class; the message says why and what would."""


def pick_arch(arch: str, factor: FactorConfig, architecture: str) -> str:
    """`auto`: Mixtral for a Llama source without shared experts, GraniteMoeShared with them
    and for a Qwen2 source (its q/k/v biases as Granite's attention biases); llama.cpp runs both."""
    if arch != "auto":
        TARGETS.get(arch, "--arch")
        return arch
    if architecture == "Qwen2ForCausalLM":
        return "granitemoeshared"
    return "granitemoeshared" if factor.n_shared else "mixtral"


def gguf_problem(arch: str) -> str | None:
    """Why llama.cpp cannot run `arch` as this module exports it (None: it can)."""
    return TARGETS.get(arch, "--arch").gguf_problem


def factor_problems(factor: FactorConfig, arch: str, approximate: bool) -> list[str]:
    """Why a model of this factor config cannot be written as `arch`, each with the option that
    would allow it (known from the config alone, before any weights are loaded)."""
    out = []
    if factor.router_mode == "random":
        out.append(
            "router_mode random picks experts at random: there is no router to export; train a router "
            "(router_mode par or lm_only)"
        )
    if factor.n_routers > 1:
        out.append(f"n_routers={factor.n_routers}: stock classes have one router per layer; use n_routers: 1")
    if factor.router_bias:
        out.append("the router has a bias, which stock classes do not: train with factor.router_bias: false")
    if COMBINES.get(factor.combine).add_unchosen_mean:
        out.append(
            f"combine {factor.combine} adds each unchosen expert's mean output, which no stock class "
            "does: use combine unscaled"
        )
    if is_constant(factor) and 1 < factor.top_k < factor.n_experts and not approximate:
        out.append(
            f"combine {factor.combine} weighs each chosen expert by a constant, which stock classes "
            f"(renormalised probabilities) match only at K = 1 or K = N, not K = {factor.top_k}: use "
            "combine weighted, or --approximate"
        )
    if factor.n_shared and TARGETS.get(arch).shared == "none":
        out.append(f"{arch} has no shared expert: use --arch granitemoeshared or qwen2_moe")
    return out


def source_problems(source, arch: str, has_ffn_bias: bool) -> list[str]:
    """Why the dense source model's layers cannot be written as `arch`."""
    model_type = getattr(source, "model_type", "?")
    if model_type not in ("llama", "qwen2"):
        return [
            f"the source model is {model_type}: only Llama and Qwen2 models map to stock MoE classes "
            f"({', '.join(TARGETS.names())}); Gemma3 and others have no stock MoE counterpart"
        ]
    out = []
    target = TARGETS.get(arch)
    if has_qkv_bias(source) and not target.attention_bias:
        out.append(f"the source's attention has q/k/v biases, which {arch} lacks: use --arch granitemoeshared")
    if getattr(source, "mlp_bias", False) or has_ffn_bias:
        out.append("the FFN has biases, which stock MoE experts lack")
    if getattr(source, "use_sliding_window", False):
        out.append("the source uses sliding-window attention; the export would not")
    return out + target.refusals(source)


def is_constant(factor: FactorConfig) -> bool:
    """Whether the combine rule weighs every chosen expert the same."""
    return factor.combine != "weighted"


def layer_tensors(ffn, factor: FactorConfig, approximate: bool) -> Layer:
    """One factorized FFN as stock-MoE tensors (see the module docstring for the mapping)."""
    n, k = factor.n_experts, factor.top_k
    experts = ffn.experts
    router = ffn.router.gate.weight.detach().float()
    constant = COMBINES.get(factor.combine).uniform_weight(n, k)  # N/K for scaled, 1 for unscaled, N for weighted
    if not is_constant(factor):
        scale = float(n)  # renormalised p x N: N into the down projections
    elif k == n:
        router, scale = torch.zeros_like(router), constant * n  # every expert runs: weights 1/N
    elif k == 1:
        scale = constant  # the renormalised weight is exactly 1
    else:  # --approximate: tiny logits, weights ~1/K
        router, scale = router * APPROXIMATE_ROUTER_SCALE, constant * k
    shared = None
    if ffn.shared is not None:
        s = ffn.shared
        shared = (s.gate_weight[0].detach().float(), s.up_weight[0].detach().float(), s.down_weight[0].detach().float())
    return Layer(
        router,
        experts.gate_weight.detach().float(),
        experts.up_weight.detach().float(),
        experts.down_weight.detach().float() * scale,
        shared,
    )


def to_stock(model: nn.Module, arch: str = "auto", approximate: bool = False) -> nn.Module:
    """A stock transformers MoE model computing what the factorized `model` computes."""
    from transformers import AutoModelForCausalLM

    layers = factorized_layers(model)
    factor, source = layers[0][1].config, model.config
    arch = pick_arch(arch, factor, type(model).__name__)
    has_ffn_bias = any(f.experts.gate_bias is not None or f.down_bias is not None for _, f in layers)
    reasons = source_problems(source, arch, has_ffn_bias)
    reasons = reasons or factor_problems(factor, arch, approximate)
    if reasons:
        raise NotExportable(f"{factor.name} cannot be exported as {arch}: " + "; ".join(reasons))
    target = TARGETS.get(arch)
    width = layers[0][1].experts.expert_width
    shared = 0 if layers[0][1].shared is None else layers[0][1].shared.expert_width
    config = target.config(source, factor.n_experts, factor.top_k, width, shared)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}  # attention, norms, embeddings
    for i, (_, ffn) in enumerate(layers):
        state |= target.tensors(i, layer_tensors(ffn, factor, approximate), source)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export to {arch}: tensors missing {missing[:4]}, unexpected {unexpected[:4]}")
    stock.config.architectures = [type(stock).__name__]
    return stock.eval()
