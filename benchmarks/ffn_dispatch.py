"""Time a factorized FFN against the dense FFN and the ideal, in one run.

    python benchmarks/ffn_dispatch.py                      # CPU, SmolLM2-135M sizes, fp32
    python benchmarks/ffn_dispatch.py --preset tinyllama-gpu

dense: the original SwiGLU FFN on all tokens. ideal: a dense FFN of width
FFN*K/N on all tokens (what perfect sparse dispatch would cost). reference: the
FactorizedFFN's plain per-expert dispatch; sorted: the fast path that sorts
token slots by expert once (both with the router included). Ratios come from
medians measured interleaved in the same process, so machine noise hits all
columns alike. Prints a markdown table; correctness is checked before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers.activations import ACT2FN

from factorllm_core import FactorConfig, build_factorized_ffn
from factorllm_core.factorize import GatedFFNWeights

PRESETS = {
    "smollm2-cpu": dict(hidden=576, ffn=1536, tokens=4096, device="cpu", dtype="float32"),
    "tinyllama-gpu": dict(hidden=2048, ffn=5632, tokens=16384, device="cuda", dtype="bfloat16"),
}


class DenseFFN(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def timer(device: str):
    def measure(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return measure


def run(hidden, ffn, tokens, device, dtype, n_experts=4, repeats=15, warmup=3):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    dense = DenseFFN(hidden, ffn).to(device, dtype).eval()
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    weights = GatedFFNWeights(dense.gate_proj.weight.data, dense.up_proj.weight.data,
                              dense.down_proj.weight.data, dense.act_fn)
    candidates = {"dense": dense}
    for top_k in range(1, n_experts):
        candidates[f"ideal K={top_k}"] = DenseFFN(hidden, ffn * top_k // n_experts).to(device, dtype).eval()
        for dispatch in DISPATCHES:
            factored = build_factorized_ffn(weights, FactorConfig(n_experts, top_k), layer_seed=0).eval()
            factored.experts.dispatch = dispatch
            candidates[f"{dispatch} 1R{n_experts}E{top_k}K"] = factored
        check_same(candidates[f"reference 1R{n_experts}E{top_k}K"], candidates[f"sorted 1R{n_experts}E{top_k}K"], x)
    check_identity(weights, x, dense, n_experts)
    measure = timer(device)
    times = {name: [] for name in candidates}
    with torch.no_grad():
        for step in range(warmup + repeats):
            for name, module in candidates.items():  # interleaved: noise hits all alike
                elapsed = measure(lambda: module(x))
                if step >= warmup:
                    times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


DISPATCHES = ("reference", "sorted")


def check_close(what: str, expected_fn, got_fn, x) -> None:
    """Refuse to time anything whose output is wrong (rel. error 1e-5 fp32, 1e-2 bf16)."""
    with torch.no_grad():
        expected, got = expected_fn(x).float(), got_fn(x).float()
    rel = ((expected - got).norm() / expected.norm()).item()
    limit = 1e-5 if x.dtype == torch.float32 else 1e-2
    if rel > limit:
        raise SystemExit(f"correctness check failed: {what} relative error {rel:.2e} > {limit}")
    print(f"correctness: {what} relative error {rel:.1e} (limit {limit:.0e})")


def check_same(reference, fast, x):
    check_close("sorted vs reference", reference, fast, x)


def check_identity(weights, x, dense, n_experts):
    """K = N must reproduce the dense FFN."""
    full = build_factorized_ffn(weights, FactorConfig(n_experts, n_experts), layer_seed=0).eval()
    check_close("K=N vs dense", dense, full, x)


def table(medians: dict, n_experts: int = 4) -> str:
    dense = medians["dense"]
    lines = ["| variant | ms | x dense | x ideal |", "|---|---:|---:|---:|",
             f"| dense | {dense * 1e3:.2f} | 1.00 | |"]
    for top_k in range(1, n_experts):
        ideal = medians[f"ideal K={top_k}"]
        lines.append(f"| ideal K={top_k} | {ideal * 1e3:.2f} | {ideal / dense:.2f} | 1.00 |")
        for name, t in medians.items():
            if name.endswith(f"E{top_k}K"):  # reference and sorted
                lines.append(f"| {name} | {t * 1e3:.2f} | {t / dense:.2f} | {t / ideal:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} needs a CUDA device; none is available")
    print(f"preset {args.preset}: {preset}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table(run(**preset, repeats=args.repeats)))


if __name__ == "__main__":
    main()
