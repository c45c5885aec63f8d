"""N experts cut from one gated FFN: `down(act(gate(x)) * up(x))`.

Expert e owns rows `neuron_index[e]` of gate and up and the same columns of down.
Weights are stored stacked per expert, laid out once at factorization time:
gate/up (N, I/N, H) and down (N, H, I/N). The down bias, if any, belongs to no
expert: it is added once by the caller, so sum(all experts) + bias == dense FFN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

log = logging.getLogger(__name__)

# (experts, x (S, H), indices (S, K), weights (S, K)) -> (S, H)
DispatchFn = Callable[["Experts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DISPATCH: Registry[DispatchFn] = Registry("dispatch")


class Experts(nn.Module):
    def __init__(self, gate_weight, up_weight, down_weight, neuron_index, act_fn, gate_bias=None, up_bias=None):
        """gate_weight, up_weight: (I, H); down_weight: (H, I); neuron_index: (N, I/N)."""
        super().__init__()
        self.n_experts, self.expert_width = neuron_index.shape
        self.register_buffer("neuron_index", neuron_index.clone())
        self.gate_weight = nn.Parameter(gate_weight[neuron_index].clone())  # (N, I/N, H)
        self.up_weight = nn.Parameter(up_weight[neuron_index].clone())  # (N, I/N, H)
        self.down_weight = nn.Parameter(down_weight[:, neuron_index].permute(1, 0, 2).contiguous())  # (N, H, I/N)
        self.gate_bias = None if gate_bias is None else nn.Parameter(gate_bias[neuron_index].clone())
        self.up_bias = None if up_bias is None else nn.Parameter(up_bias[neuron_index].clone())
        self.act_fn = act_fn
        self.dispatch = "auto"  # a DISPATCH name; "auto" = the fast path for this device
        self.last_dispatch: str | None = None  # the path the latest call ran (`auto` resolved)

    def expert_forward(
        self, expert: int, x: torch.Tensor, scale: torch.Tensor | float | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one expert on its tokens. x: (M, H) -> (M, H); `scale` (M, 1) multiplies
        each token's output, applied before the down projection (linear, and narrower).
        `out` (inference only): write the result there, with the activation done in
        place (SiLU) and a float `scale` folded into the down GEMM: no fresh buffer
        and no pass over the hidden states beyond the GEMMs' own."""
        gate = _project(x, self.gate_weight[expert], _row(self.gate_bias, expert))
        up = _project(x, self.up_weight[expert], _row(self.up_bias, expert))
        if out is None:
            hidden = self.act_fn(gate) * up
            if scale is not None:
                hidden = hidden * (scale.to(hidden.dtype) if torch.is_tensor(scale) else scale)
            return F.linear(hidden, self.down_weight[expert])
        if torch.is_grad_enabled():
            raise RuntimeError("expert_forward(out=...) works in place: inference only (torch.no_grad())")
        hidden = (F.silu(gate, inplace=True) if _is_silu(self.act_fn) else self.act_fn(gate)).mul_(up)
        if torch.is_tensor(scale):
            hidden.mul_(scale.to(hidden.dtype))
        alpha = 1.0 if scale is None or torch.is_tensor(scale) else scale
        return out.addmm_(hidden, self.down_weight[expert].t(), beta=0, alpha=alpha)  # beta=0: out's old values ignored

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
        implementation ("auto": `auto_dispatch`); all give the same result."""
        name = auto_dispatch(x, self.gate_weight.dtype) if self.dispatch == "auto" else self.dispatch
        self.last_dispatch = name
        return DISPATCH.get(name, "dispatch")(self, x, indices, weights)


def auto_dispatch(x: torch.Tensor, weight_dtype: torch.dtype) -> str:
    """The fast path for x's device: `grouped` (no host sync) where the device has a
    grouped GEMM for the dtype (CUDA, compute capability >= 9.0, bf16 inputs and
    weights, which rules out fp32 weights under autocast) and this torch has
    `torch._grouped_mm`, else `sorted` (with the reason logged once)."""
    if x.is_cuda and x.dtype == weight_dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0):
        if has_grouped_mm():
            return "grouped"
        _log_once(
            f"dispatch auto: torch {torch.__version__} has no torch._grouped_mm; using `sorted` (torch >= 2.8 has it)"
        )
    return "sorted"


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


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


@dataclass
class SortedSlots:
    """The S*K (token, slot) pairs grouped by expert: slot j of the sorted order is
    token `token_of[j]`, with combine weight `scales[j]`; `order` maps sorted
    positions back to flat (token, slot) positions; expert e owns `counts[e]`
    consecutive slots. Everything stays on the device (no host sync)."""

    order: torch.Tensor  # (S*K,)
    token_of: torch.Tensor  # (S*K,)
    scales: torch.Tensor | None  # (S*K, 1); None when made without weights
    counts: torch.Tensor  # (N,) int64

    @classmethod
    def of(cls, indices: torch.Tensor, weights: torch.Tensor | None, n_experts: int) -> SortedSlots:
        """`weights` None: no `scales` (the caller folds one uniform weight in itself)."""
        flat = indices.reshape(-1)
        # At inference each row is computed on its own (the order within an expert's
        # slots changed no output bit in our checks), and on CPU the unstable sort
        # takes half the time (~75 us instead of ~150 at 4,096 slots). Training keeps
        # token order: the weight gradients sum over the rows, so their rounding (and
        # a trained result) would depend on the sort. On CUDA the stable sort keeps
        # each expert's rows in token order.
        order = torch.argsort(flat, stable=flat.is_cuda or torch.is_grad_enabled())
        counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # bincount would sync on CUDA (it reads the max)
        top_k = indices.shape[1]
        token_of = order if top_k == 1 else order // top_k
        scales = None if weights is None else weights.reshape(-1)[order].unsqueeze(1)
        return cls(order, token_of, scales, counts)


# CPU inference works through the tokens in blocks whose gathered copy (S_block * K
# rows) is at most this many bytes: small enough to stay in cache between the gather,
# the GEMMs and the add-back, large enough that each expert's GEMM keeps ~1,000 rows.
# Tuned on SmolLM2 sizes on a 2-core Xeon VM (see perf/ffn_dispatch.py).
CPU_BLOCK_BYTES = 16 << 20


@DISPATCH.register("sorted")
def sorted_segments(experts: Experts, x, indices, weights):
    """Sort the S*K (token, slot) pairs by expert once (no per-expert scan of all
    slots); every expert runs on one contiguous slice of a single gathered copy of the
    inputs, scales at the intermediate width, and its outputs are added back in one
    pass. It reads the per-expert counts on the host (at inference also whether the
    combine weights are all equal): the CPU path.

    Inference on CPU goes through the tokens in blocks (see CPU_BLOCK_BYTES):
    measured ~10% faster at K = 2, 3 with SmolLM2 sizes, and slower at K = 1 when
    the blocks make each expert's GEMM smaller, hence the limit on gathered bytes.
    Decode-sized inference (see DECODE_SLOTS) skips the sort altogether."""
    if torch.is_grad_enabled():
        return _sorted_block(experts, x, indices, weights, torch.empty_like(x))
    if indices.numel() <= DECODE_SLOTS:
        return _decode_sized(experts, x, indices, weights)
    out = torch.empty_like(x)
    gathered_bytes = x.numel() * indices.shape[1] * x.element_size()
    n_blocks = max(1, -(-gathered_bytes // CPU_BLOCK_BYTES)) if x.device.type == "cpu" else 1
    step = max(1, -(-x.shape[0] // n_blocks))  # equal blocks
    uniform = _uniform(weights)  # read once per call, not per block
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        _sorted_block(experts, x[rows], indices[rows], weights[rows], out[rows], uniform)
    return out


# At or below this many (token, slot) pairs (decoding: S = batch size), inference
# skips the sort: each op's fixed cost, not the data, sets the time there.
DECODE_SLOTS = 16


def _decode_sized(experts: Experts, x, indices, weights):
    """Inference on a few tokens: read the routing on the host once and run each
    chosen expert on its tokens directly. At one token and K = 1 that is ~10 tensor
    ops instead of ~35 (sort, gather, inverse, un-permute), which dominate there;
    one token skips the gather and add-back too (K = 2 on CPU, SmolLM2 sizes:
    ~260 us instead of ~375)."""
    picks, factors = indices.tolist(), weights.tolist()
    if x.shape[0] == 1:  # one token: each chosen expert runs on x itself, no gather or add-back
        out = None
        for expert, factor in zip(picks[0], factors[0]):
            y = experts.expert_forward(expert, x, factor)
            out = y if out is None else out.add_(y)
        return out
    pairs_of: dict[int, list[tuple[int, int]]] = {}
    for token, row in enumerate(picks):
        for slot, expert in enumerate(row):
            pairs_of.setdefault(expert, []).append((token, slot))
    out = torch.zeros_like(x)
    for expert, pairs in pairs_of.items():
        tokens = [token for token, _ in pairs]
        scales = [factors[token][slot] for token, slot in pairs]
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, device=x.device).unsqueeze(1)
        rows = torch.tensor(tokens, device=x.device)
        out.index_add_(0, rows, experts.expert_forward(expert, x.index_select(0, rows), scale))
    return out


def _sorted_block(experts: Experts, x, indices, weights, out, uniform: float | None = None):
    """`sorted` on one block of tokens, written into `out` (same shape as x).
    `uniform` (inference): the value all combine weights share, folded into the down
    GEMM (alpha) instead of a per-row scale."""
    slots = SortedSlots.of(indices, weights if uniform is None else None, experts.n_experts)
    counts = slots.counts.tolist()  # the host sync
    inputs = x.index_select(0, slots.token_of)  # (S*K, H), grouped by expert
    scales = [uniform] * len(counts) if slots.scales is None else slots.scales.split(counts)
    parts = zip(range(experts.n_experts), inputs.split(counts), scales)
    if torch.is_grad_enabled():
        pieces = [experts.expert_forward(e, part, scale) for e, part, scale in parts if len(part)]
        outputs = torch.cat(pieces) if pieces else inputs  # no tokens: nothing ran
    else:  # each expert's output overwrites its own inputs: no fresh buffers
        for e, part, scale in parts:
            if len(part):
                experts.expert_forward(e, part, scale, out=part)
        outputs = inputs
    if indices.shape[1] == 1:  # a permutation: gather each token's row back
        # (a gather: 2.6x faster than index_copy_'s scatter at 4,096 x 576 fp32 on CPU)
        inverse = _inverse(slots.order)
        if torch.is_grad_enabled():
            return outputs.index_select(0, inverse)
        return torch.index_select(outputs, 0, inverse, out=out)
    return out.zero_().index_add_(0, slots.token_of, outputs)  # faster than gather+sum on CPU


def _project(x, weight, bias):
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


@DISPATCH.register("grouped")
def grouped(experts: Experts, x, indices, weights):
    """No host synchronisation: the per-expert offsets stay on the device and one
    grouped GEMM per projection (`torch._grouped_mm`) runs all experts, so shapes
    depend only on S and K (CUDA-graph and torch.compile friendly). The GPU path."""
    slots = SortedSlots.of(indices, weights, experts.n_experts)
    flat = indices.reshape(-1)
    offsets = slots.counts.cumsum(0).to(torch.int32)  # end of each expert's rows
    inputs = x.index_select(0, slots.token_of)
    gate = torch._grouped_mm(inputs, experts.gate_weight.transpose(1, 2), offs=offsets)  # (S*K, I/N)
    up = torch._grouped_mm(inputs, experts.up_weight.transpose(1, 2), offs=offsets)
    if experts.gate_bias is not None:
        gate = gate + experts.gate_bias.index_select(0, flat[slots.order])
    if experts.up_bias is not None:
        up = up + experts.up_bias.index_select(0, flat[slots.order])
    hidden = experts.act_fn(gate) * up * slots.scales.to(up.dtype)
    outputs = torch._grouped_mm(hidden, experts.down_weight.transpose(1, 2), offs=offsets)  # (S*K, H)
    return _unpermute(outputs, slots, x.shape[0], indices.shape[1])


def _unpermute(outputs, slots: SortedSlots, n_tokens: int, top_k: int):
    """Expert outputs in sorted order -> (S, H): one gather back to (token, slot)
    order and a sum over the K slots (no atomic adds)."""
    back = outputs.index_select(0, _inverse(slots.order))
    return back if top_k == 1 else back.view(n_tokens, top_k, outputs.shape[1]).sum(dim=1)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: inverse[order[j]] = j (on the device, no sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))


def _is_silu(act_fn) -> bool:
    """nn.SiLU, or transformers' SiLUActivation (what ACT2FN["silu"] gives)."""
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _uniform(weights: torch.Tensor) -> float | None:
    """The value every combine weight has, if they are all equal (the `scaled` combine:
    N/K for every slot), else None. Reads the weights on the host."""
    if weights.numel() == 0:
        return None
    low, high = torch.stack(torch.aminmax(weights)).tolist()  # one host read
    return low if low == high else None


def _row(bias: torch.Tensor | None, expert: int) -> torch.Tensor | None:
    return None if bias is None else bias[expert]
