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
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, _name=name: inputs.__setitem__(_name, args[0].detach()))
        for name, layer in layers
    ]
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
        per_layer.append(
            {"layer": name, **stats.summary(), "expert_similarity": None if similarity.isnan() else float(similarity)}
        )
    return {"tokens": int(input_ids.numel()), "layers": per_layer, "summary": _summarize(per_layer)}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarize(per_layer: list[dict]) -> dict:
    return {
        key: _mean([layer[key] for layer in per_layer])
        for key in (
            "load_max_over_mean",
            "routing_entropy",
            "routing_entropy_normalized",
            "router_agreement",
            "expert_similarity",
        )
    }


@torch.no_grad()
def chosen_experts(model, input_ids: torch.Tensor, device: str) -> torch.Tensor:
    """(layers, tokens, top_k) the experts each factorized layer picks for each probe
    token, sorted per token (a set), from one eval-mode pass. Does not change the
    model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with collect_aux(model) as aux:
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return torch.stack([record.routing.indices.sort(dim=-1).values.cpu() for _, record in aux.records])


def churn(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Share of (layer, token) pairs whose chosen expert set differs between two
    `chosen_experts` results."""
    return float((previous != current).any(dim=-1).float().mean())


class ChurnMonitor:
    """Routing churn during training: at `every` optimizer steps (and the last), the
    share of probe tokens whose chosen expert set changed since the previous
    measurement. The series is [[step, churn], ...]; `state` goes into checkpoints
    so a resumed run continues the same series."""

    def __init__(self, model, probe_ids: torch.Tensor, device: str, every: int):
        self.model, self.probe_ids, self.device, self.every = model, probe_ids, device, every
        self.previous: torch.Tensor | None = None
        self.series: list[list] = []

    def start(self) -> None:
        if self.previous is None:
            self.previous = chosen_experts(self.model, self.probe_ids, self.device)

    def after_step(self, step: int, last: bool) -> None:
        if step % self.every and not last:
            return
        current = chosen_experts(self.model, self.probe_ids, self.device)
        self.series.append([step, churn(self.previous, current)])
        self.previous = current

    def state(self) -> dict:
        return {"previous": self.previous, "series": self.series, "every": self.every}

    def load_state(self, state: dict) -> None:
        self.previous, self.series = state["previous"], [list(p) for p in state["series"]]
