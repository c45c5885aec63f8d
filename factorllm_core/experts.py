"""N experts cut from one gated FFN: `down(act(gate(x)) * up(x))`.

Expert e owns rows `neuron_index[e]` of gate and up and the same columns of down.
Weights are stored stacked per expert, laid out once at factorization time:
gate/up (N, I/N, H) and down (N, H, I/N). The down bias, if any, belongs to no
expert: it is added once by the caller, so sum(all experts) + bias == dense FFN.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

# (experts, x (S, H), indices (S, K), weights (S, K)) -> (S, H)
DispatchFn = Callable[["Experts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DISPATCH: Registry[DispatchFn] = Registry("dispatch")


class Experts(nn.Module):
    def __init__(self, gate_weight, up_weight, down_weight, neuron_index, act_fn,
                 gate_bias=None, up_bias=None):
        """gate_weight, up_weight: (I, H); down_weight: (H, I); neuron_index: (N, I/N)."""
        super().__init__()
        self.n_experts, self.expert_width = neuron_index.shape
        self.register_buffer("neuron_index", neuron_index.clone())
        self.gate_weight = nn.Parameter(gate_weight[neuron_index].clone())  # (N, I/N, H)
        self.up_weight = nn.Parameter(up_weight[neuron_index].clone())  # (N, I/N, H)
        self.down_weight = nn.Parameter(down_weight[:, neuron_index].permute(1, 0, 2).clone())  # (N, H, I/N)
        self.gate_bias = None if gate_bias is None else nn.Parameter(gate_bias[neuron_index].clone())
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias[neuron_index].clone())
        self.act_fn = act_fn
        self.dispatch = "auto"  # a DISPATCH name; "auto" = the fast path for this device

    def expert_forward(self, expert: int, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Run one expert on its tokens. x: (M, H) -> (M, H); `scale` (M, 1) multiplies
        each token's output, applied before the down projection (linear, and narrower)."""
        gate = F.linear(x, self.gate_weight[expert], _row(self.gate_bias, expert))
        up = F.linear(x, self.up_weight[expert], _row(self.up_bias, expert))
        hidden = self.act_fn(gate) * up
        if scale is not None:
            hidden = hidden * scale.to(hidden.dtype)
        return F.linear(hidden, self.down_weight[expert])

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, batched. x: (S, H) -> (S, N, H).

        Used for the PAR teacher and the collapse statistics, never for inference.
        """
        gate = torch.einsum("sh,nih->sni", x, self.gate_weight)
        up = torch.einsum("sh,nih->sni", x, self.up_weight)
        if self.gate_bias is not None:
            gate = gate + self.gate_bias
        if self.up_bias is not None:
            up = up + self.up_bias
        return torch.einsum("sni,nhi->snh", self.act_fn(gate) * up, self.down_weight)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sparse dispatch: each expert runs on exactly the tokens routed to it.
        x: (S, H); indices, weights: (S, K) -> (S, H). `self.dispatch` names the
        implementation ("auto" picks the fast one); all give the same result."""
        name = "sorted" if self.dispatch == "auto" else self.dispatch
        return DISPATCH.get(name, "dispatch")(self, x, indices, weights)


@DISPATCH.register("reference")
def reference(experts: Experts, x, indices, weights):
    """Plain and obviously correct: per expert, find its tokens, run it, add back.
    The per-expert `nonzero` scans all slots and syncs with the host each time."""
    out = torch.zeros_like(x)
    for expert in range(experts.n_experts):
        token_idx, slot = torch.nonzero(indices == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        y = experts.expert_forward(expert, x[token_idx])
        out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(1).to(y.dtype))
    return out


@DISPATCH.register("sorted")
def sorted_segments(experts: Experts, x, indices, weights):
    """Sort the S*K (token, slot) pairs by expert once (no per-expert scan of all
    slots); every expert runs on one contiguous slice of a single gathered copy of the
    inputs, scales at the intermediate width, and adds its outputs straight back.
    One host sync (the per-expert counts) per call."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1)  # (S*K,) expert of each (token, slot)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k  # (S*K,) token of each sorted slot
    counts = torch.bincount(flat, minlength=experts.n_experts).tolist()
    inputs = x.index_select(0, token_of)  # (S*K, H), grouped by expert
    scales = weights.reshape(-1)[order].unsqueeze(1)  # (S*K, 1)
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            part = slice(start, start + count)
            out.index_add_(0, token_of[part], experts.expert_forward(expert, inputs[part], scales[part]))
        start += count
    return out


def _row(bias: torch.Tensor | None, expert: int) -> torch.Tensor | None:
    return None if bias is None else bias[expert]
