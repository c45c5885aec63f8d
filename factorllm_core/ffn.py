"""FactorizedFFN: a drop-in replacement for a gated FFN, routed over N experts.

Forward (per token): router probabilities averaged over R routers -> top-K ->
only the chosen experts run on their tokens -> combined with the combine rule's
weights (+ the shared experts, + the unchosen experts' calibration means under
`mean_comp`). In training with a PAR router the teacher (all experts on the same
input, i.e. the dense FFN on the hidden state the student really sees) is
computed too, so the pseudo-labels and PA loss come for free and the student
output is gathered from the same expert outputs.

Auxiliary losses come back from `forward_with_aux`. Hugging Face decoder layers
call `mlp(x)` and expect a tensor, so `forward` returns the tensor and hands the
aux to an `AuxCollector` only while one is attached by `collect_aux(model)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FactorConfig
from .experts import DISPATCH, Experts
from .par import PSEUDO_LABELS, LabelContext, balance_loss, pa_loss
from .router import Router, Routing


@dataclass
class FFNAux:
    """What one FactorizedFFN call produced besides its output."""

    routing: Routing
    balance_loss: torch.Tensor | None  # scalar, only in training (no use at inference)
    pa_loss: torch.Tensor | None = None  # scalar, only when the PAR teacher ran
    pseudo_labels: torch.Tensor | None = None  # (S, N) multi-hot


class FactorizedFFN(nn.Module):
    """output = combine(chosen routed experts) [+ shared experts] [+ unchosen experts'
    calibration means] [+ down bias].

    shared: the always-active neurons as one wide expert (`Experts` with one row of
        neuron_index), or None.
    unchosen_mean: (N, H) buffer, each routed expert's mean output on calibration
        tokens; present only when the combine rule adds it (`mean_comp`).
    """

    def __init__(
        self,
        config: FactorConfig,
        router: Router,
        experts: Experts,
        down_bias: torch.Tensor | None = None,
        shared: Experts | None = None,
    ):
        super().__init__()
        self.config = config
        self.router = router
        self.experts = experts
        self.shared = shared
        self.down_bias = None if down_bias is None else nn.Parameter(down_bias.clone())
        self.pseudo_label = PSEUDO_LABELS.get(config.pseudo_label, "pseudo_label")
        self._chosen_weight = router.combine.uniform_weight(experts.n_experts, router.top_k)
        if router.combine.add_unchosen_mean:
            self.register_buffer(
                "unchosen_mean", experts.down_weight.new_zeros(experts.n_experts, experts.down_weight.shape[1])
            )
        else:
            self.unchosen_mean = None
        self.fit_report: dict | None = None  # set by the builder when router_init fits the router
        self._collector: tuple[AuxCollector, str] | None = None

    def label_context(self) -> LabelContext:
        return LabelContext(self._chosen_weight, self.unchosen_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.forward_with_aux(x)
        if self._collector is not None:
            collector, name = self._collector
            collector.add(name, aux)
        return y

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, FFNAux]:
        """x: (..., H) -> (output (..., H), FFNAux over the flattened tokens)."""
        flat = x.reshape(-1, x.shape[-1])  # (S, H)
        routing = self.router(flat)
        aux = FFNAux(routing, balance_loss(routing.probs, routing.indices) if self.training else None)
        if self.training and self.router.mode.uses_pa_loss:
            y = self._forward_with_teacher(flat, routing, aux)
        else:
            y = self.experts(flat, routing.indices, routing.weights)
        if self.shared is not None:
            y = y + self.shared.expert_forward(0, flat)
        if self.unchosen_mean is not None:  # all experts' means, less the chosen ones'
            y = y + (self.unchosen_mean.sum(0) - self.unchosen_mean[routing.indices].sum(1)).to(y.dtype)
        if self.down_bias is not None:
            y = y + self.down_bias
        return y.view_as(x), aux

    def _forward_with_teacher(self, flat: torch.Tensor, routing: Routing, aux: FFNAux) -> torch.Tensor:
        all_outputs = self.experts.all_outputs(flat)  # (S, N, H)
        with torch.no_grad():
            aux.pseudo_labels = self.pseudo_label(all_outputs.float(), self.config.top_k, self.label_context())
        aux.pa_loss = pa_loss(routing.router_probs, aux.pseudo_labels)
        index = routing.indices.unsqueeze(-1).expand(-1, -1, flat.shape[-1])  # (S, K, H)
        chosen = all_outputs.gather(1, index)
        return (chosen * routing.weights.unsqueeze(-1).to(chosen.dtype)).sum(dim=1)


@dataclass
class AuxCollector:
    """Per-layer FFNAux of every FactorizedFFN call made while attached, in call order."""

    records: list[tuple[str, FFNAux]] = field(default_factory=list)

    def add(self, name: str, aux: FFNAux) -> None:
        self.records.append((name, aux))

    # Both losses are summed over layers, as in the released code: its lambda_pa = 0.05
    # and lambda_balance = 0.01 weigh each layer's term, so a deeper model's router
    # losses weigh more against the one LM loss.
    def pa_loss(self) -> torch.Tensor | None:
        """PA loss summed over layers, or None when no layer computed one."""
        losses = [aux.pa_loss for _, aux in self.records if aux.pa_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def balance_loss(self) -> torch.Tensor | None:
        """Balance loss summed over layers (training only), or None."""
        losses = [aux.balance_loss for _, aux in self.records if aux.balance_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def clear(self) -> None:
        self.records.clear()


def factorized_layers(model: nn.Module) -> list[tuple[str, FactorizedFFN]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedFFN)]


@contextmanager
def collect_aux(model: nn.Module) -> Iterator[AuxCollector]:
    """Attach one collector to every FactorizedFFN in `model` for the duration."""
    collector = AuxCollector()
    layers = factorized_layers(model)
    for name, layer in layers:
        layer._collector = (collector, name)
    try:
        yield collector
    finally:
        for _, layer in layers:
            layer._collector = None


@contextmanager
def use_dispatch(model: nn.Module, name: str) -> Iterator[None]:
    """Every FactorizedFFN in `model` dispatches with `name` (a DISPATCH path or
    "auto") for the duration; their previous choice is restored after."""
    if name != "auto":
        DISPATCH.get(name, "dispatch")  # unknown name: the registry's error, before anything changes
    layers = [layer for _, layer in factorized_layers(model)]
    saved = [layer.experts.dispatch for layer in layers]
    for layer in layers:
        layer.experts.dispatch = name
    try:
        yield
    finally:
        for layer, previous in zip(layers, saved):
            layer.experts.dispatch = previous
