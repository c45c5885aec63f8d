"""`fused` dispatch: two Triton kernels for inference on a GPU (opt-in).

Layout: the S*K (token, slot) pairs sorted by expert (`SortedSlots`), expert e
owning rows [start[e], start[e] + count[e]) of that order. Each kernel program
takes one BLOCK_M-row tile of one expert and one BLOCK_N-column tile of the
output; it finds its expert from the per-expert counts on the device (no
padding, no host sync, so the launch grid depends only on S*K).

1. gate/up: the gather of token rows is fused into the loads of the GEMM;
   hidden[row] = silu(x[token] @ Wg[e].T) * (x[token] @ Wu[e].T) * scale[row],
   written once, in sorted order, at the expert width.
2. down: hidden[row] @ Wd[e].T, stored straight to the row's (token, slot)
   position, so the un-permute is fused into the store; the K slots of a token
   are summed after (no atomics).

Limits, checked with a clear error: inference only (no autograd), SiLU-gated
FFNs without gate/up biases, bf16/fp16 on CUDA (or CPU tensors under
TRITON_INTERPRET=1, which the tests use). Triton is imported only when this
path runs. Not measured on a GPU yet, so `auto` does not pick it: select it
with `experts.dispatch = "fused"`, or `latency.dispatch: fused` in a trial or
grid to time it there (see perf/gpu_check.sh).
"""

from __future__ import annotations

import functools
import os

import torch

from .experts import DISPATCH, Experts, SortedSlots, _is_silu


@DISPATCH.register("fused")
def fused(experts: Experts, x, indices, weights):
    _check_supported(experts, x, weights)
    kernels = _kernels()
    n_tokens, top_k = indices.shape
    width, hidden_size, rows = experts.expert_width, x.shape[1], indices.numel()
    slots = SortedSlots.of(indices, weights, experts.n_experts)
    counts = slots.counts.to(torch.int32)
    starts = counts.cumsum(0, dtype=torch.int32) - counts
    token_of = slots.token_of.to(torch.int32)
    order = slots.order.to(torch.int32)
    scales = slots.scales.reshape(-1).float()
    x = x.contiguous()
    hidden = torch.empty(rows, width, device=x.device, dtype=x.dtype)
    kernels.launch_gate_up(x, experts.gate_weight, experts.up_weight, token_of, scales, counts, starts, hidden)
    out = torch.empty(rows, hidden_size, device=x.device, dtype=x.dtype)
    kernels.launch_down(hidden, experts.down_weight, order, counts, starts, out)
    return out if top_k == 1 else out.view(n_tokens, top_k, hidden_size).sum(dim=1)


def _check_supported(experts: Experts, x, weights) -> None:
    problems = []
    if torch.is_grad_enabled() and (
        x.requires_grad or weights.requires_grad or any(p.requires_grad for p in experts.parameters())
    ):
        problems.append("it is inference only: run under torch.no_grad() or use dispatch 'grouped' for training")
    if experts.gate_bias is not None or experts.up_bias is not None:
        problems.append("the experts have gate/up biases, which it does not add")
    if not _is_silu(experts.act_fn):
        problems.append(f"activation {type(experts.act_fn).__name__} is not SiLU")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(
            f"it needs a CUDA device, and x is on {x.device} (TRITON_INTERPRET=1 runs it on CPU, slowly, for tests)"
        )
    if x.is_cuda and x.dtype == torch.float32:
        problems.append("in fp32 on a GPU its dots would run in TF32: use bf16/fp16, or dispatch 'grouped'")
    if not all(w.is_contiguous() for w in (experts.gate_weight, experts.up_weight, experts.down_weight)):
        problems.append("expert weights are not contiguous")
    if problems:
        raise RuntimeError("dispatch 'fused' cannot run here: " + "; ".join(problems))


@functools.cache
def _kernels():
    try:
        from . import fused_kernels
    except ImportError as error:
        raise RuntimeError(
            "dispatch 'fused' needs Triton (pip install triton; CUDA builds of torch ship it)"
        ) from error
    return fused_kernels
