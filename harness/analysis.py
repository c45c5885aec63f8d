"""Per-layer routing statistics and expert similarity on held-out real text."""

from __future__ import annotations

import torch

from factorllm_core import RoutingStats, collect_aux, expert_similarity, factorized_layers


@torch.no_grad()
def analyze_routing(model, input_ids: torch.Tensor, device: str) -> dict:
    """One eval-mode pass over `input_ids` (1, T): expert load, entropy and router
    agreement per layer (the conflict and imbalance signals), and the mean pairwise
    cosine similarity of all experts' outputs on each layer's real input (collapse)."""
    model.eval()
    layers = factorized_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, _name=name: inputs.__setitem__(_name, args[0].detach()))
        for name, layer in layers]
    try:
        with collect_aux(model) as aux:
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    records = dict(aux.records)
    per_layer = []
    for name, layer in layers:
        config = layer.config
        stats = RoutingStats(config.n_experts, config.n_routers, config.top_k)
        stats.update(records[name].routing)
        flat = inputs[name].reshape(-1, inputs[name].shape[-1])
        similarity = expert_similarity(layer.experts.all_outputs(flat.to(layer.experts.gate_weight.dtype)))
        per_layer.append({"layer": name, **stats.summary(),
                          "expert_similarity": None if similarity.isnan() else float(similarity)})
    return {"tokens": int(input_ids.numel()), "layers": per_layer, "summary": _summarize(per_layer)}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarize(per_layer: list[dict]) -> dict:
    return {key: _mean([layer[key] for layer in per_layer])
            for key in ("load_max_over_mean", "routing_entropy", "routing_entropy_normalized",
                        "router_agreement", "expert_similarity")}
