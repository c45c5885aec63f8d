"""FLOPs per token by module with fvcore, on real text (routing depends on the data).

fvcore counts one FLOP per multiply-add and skips SDPA, so the model is traced
with eager attention, where the score and value matmuls are plain matmuls it
counts. Modules are grouped into attention (q/k/v/o projections + score/value
matmuls), ffn (the experts actually run + the router, or the dense MLP), lm_head
and other; total is fvcore's whole-model count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

COUNTING_CONVENTION = "fvcore: 1 FLOP per multiply-add (MAC); SDPA uncounted, so eager attention is traced"


class _LogitsOnly(torch.nn.Module):
    """fvcore traces with torch.jit; the HF output object and KV cache get in its way."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def _category(module_name: str) -> str | None:
    parts = module_name.split(".")
    if "self_attn" in parts or "attention" in parts:
        return "attention"
    if "mlp" in parts or "feed_forward" in parts:
        return "ffn"
    if parts[-1] == "lm_head":
        return "lm_head"
    return None


def _product_macs(first: int):
    """A handle counting m*k*n for the (m, k) @ (k, n) product at inputs[first],
    inputs[first + 1], for the forms fvcore's own handles reject or lack:
    aten::mm with `out=` (a third input) and aten::addmm_ (in place, operands after
    self). The `sorted` dispatch's in-place inference path runs its GEMMs that way."""

    def macs(inputs, outputs) -> int:
        from fvcore.nn.jit_handles import get_shape

        (m, k), (_, n) = get_shape(inputs[first]), get_shape(inputs[first + 1])
        return m * k * n

    return macs


def _grouped_mm_macs(inputs, outputs) -> int:
    """torch._grouped_mm(x (rows, k), w (groups, k, n), offs): each row meets one group's
    (k, n) matrix, so rows x k x n, whatever the split (the `grouped` dispatch)."""
    from fvcore.nn.jit_handles import get_shape

    (rows, k), (_, _, n) = get_shape(inputs[0]), get_shape(inputs[1])
    return rows * k * n


EXTRA_HANDLES = {"aten::mm": _product_macs(0), "aten::addmm_": _product_macs(1), "aten::_grouped_mm": _grouped_mm_macs}

# An uncounted product would silently shrink the FLOPs: any op whose name has one of
# these in it must have a handle, or counting fails.
MATMUL_OP_MARKERS = ("mm", "matmul", "linear", "einsum", "dot", "mv", "_grouped")


def count_flops(model, input_ids: torch.Tensor) -> dict:
    """input_ids: (1, T) real text. Returns GFLOPs per token by category, and the raw totals."""
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_LogitsOnly(model).eval(), (input_ids,))
            for op, handle in EXTRA_HANDLES.items():
                analysis.set_op_handle(op, handle)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by_module = analysis.by_module()
            total = analysis.total()
            uncounted = sorted(
                op
                for op in analysis.unsupported_ops()
                if any(marker in op.split("::")[-1] for marker in MATMUL_OP_MARKERS)
            )
    finally:
        model.set_attn_implementation(previous)
    if uncounted:
        raise RuntimeError(
            f"fvcore has no FLOP handle for {uncounted}: the count would leave these products "
            "out; add a handle in harness/flops.py"
        )
    sums = {"attention": 0, "ffn": 0, "lm_head": 0}
    for name, flops in by_module.items():
        category = _category(name) if name else None
        parent = name.rpartition(".")[0]
        # by_module lists every ancestor too: count only the outermost module of a category
        if category and (not parent or _category(parent) != category):
            sums[category] += flops
    tokens = input_ids.numel()
    per_token = {f"{k}_gflops_per_token": v / tokens / 1e9 for k, v in sums.items()}
    per_token["total_gflops_per_token"] = total / tokens / 1e9
    per_token["other_gflops_per_token"] = (total - sum(sums.values())) / tokens / 1e9
    per_token.update(tokens=tokens, convention=COUNTING_CONVENTION)
    return per_token


def count_dense_flops_cached(model, input_ids: torch.Tensor, cache_dir=None) -> dict:
    """`count_flops` for a model without factorized layers, remembered on disk: a dense
    model's count depends only on its architecture (config), dtype and the token ids,
    never on its weights, so every trial of a sweep (the dense baseline and each
    variant's dense reference) reads one count instead of tracing the model again
    (~12 s for SmolLM2-135M at 2,048 tokens on 2 CPU cores)."""
    import hashlib
    import json
    from importlib import metadata

    from factorllm_core import factorized_layers
    from harness.assets.cache import default_cache_root
    from reports.record import write_json_atomic

    if factorized_layers(model):
        raise ValueError(
            "count_dense_flops_cached counts dense models only: routing makes a factorized "
            "model's FLOPs depend on its weights"
        )
    key = json.dumps(
        [
            model.config.to_json_string(use_diff=False),
            str(next(model.parameters()).dtype),
            input_ids.tolist(),
            COUNTING_CONVENTION,
            metadata.version("fvcore"),
            torch.__version__,
        ]
    )
    path = (
        (default_cache_root() if cache_dir is None else Path(cache_dir))
        / "flops"
        / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: count again
        pass
    counted = count_flops(model, input_ids)
    write_json_atomic(path, counted)
    return counted
