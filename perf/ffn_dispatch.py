"""Time a factorized FFN against the dense FFN and the ideal, in one run.

    python perf/ffn_dispatch.py                          # CPU, SmolLM2-135M sizes, fp32, 4,096 tokens
    python perf/ffn_dispatch.py --preset tinyllama-gpu   # H100/H200: TinyLlama sizes, bf16, 16,384 tokens
    python perf/ffn_dispatch.py --preset tinyllama-gpu-256 --graphs   # decode-sized, CUDA graphs

dense: the original SwiGLU FFN on all tokens. ideal: a dense FFN of width
FFN*K/N on all tokens (what perfect sparse dispatch would cost). Then one
row per dispatch path of the FactorizedFFN, router included: `reference`
(plain per-expert loop), `sorted` (sort once, per-expert GEMMs; the CPU path),
`grouped` (no host sync, grouped GEMMs; the GPU path) and, on CUDA with Triton,
`fused` (two Triton kernels, opt-in). Every round times all candidates back to
back, so noise on a shared machine hits them alike; each ratio is the median
over rounds of that round's ratio. Each timed call follows an untimed call of
the same candidate: on CPU, what the previous candidate left in the caches and
in the allocator otherwise moved a candidate's time by up to 10%. The last
column shows the middle half (quartiles) of the per-round ratios to the ideal.
Correctness is checked before anything is timed, and on CUDA `grouped` and
`fused` run once under `torch.cuda.set_sync_debug_mode("error")`, which fails on
any host sync.
`--graphs` (CUDA) captures every candidate in a CUDA graph and times replays;
paths that sync with the host cannot be captured and are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import bench_checks  # beside this script
import torch
from torch import nn
from transformers.activations import ACT2FN

from factorllm_core import FactorConfig, build_factorized_ffn
from factorllm_core.factorize import GatedFFNWeights

PRESETS = {
    "smollm2-cpu": dict(hidden=576, ffn=1536, tokens=4096, device="cpu", dtype="float32"),
    "tinyllama-gpu": dict(hidden=2048, ffn=5632, tokens=16384, device="cuda", dtype="bfloat16"),
    "tinyllama-gpu-256": dict(hidden=2048, ffn=5632, tokens=256, device="cuda", dtype="bfloat16"),
    "tiny-cpu": dict(hidden=64, ffn=256, tokens=256, device="cpu", dtype="float32"),  # for the tests
}
GRAPH_SAFE = ("grouped", "fused")  # no host sync: can be captured in a CUDA graph


def default_dispatches(device: str) -> tuple[str, ...]:
    """Every path that can run on the device: `fused` (Triton) only on CUDA with Triton."""
    paths = ("reference", "sorted", "grouped")
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        paths += ("fused",)
    return paths


class DenseFFN(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def timer(device: str, inner: int):
    """Seconds per call, averaged over `inner` back-to-back calls (short calls on a
    GPU would otherwise measure the launch and the synchronisation)."""

    def measure(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / inner

    return measure


def cuda_graph(fn, x):
    """Capture fn(x) once; the returned callable replays it (x must stay the same tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up lazy initialisation outside the capture
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def build(hidden, ffn, tokens, device, dtype, dispatches, n_experts=4):
    """Every candidate module, after the correctness checks."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    dense = DenseFFN(hidden, ffn).to(device, dtype).eval()
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    weights = GatedFFNWeights(
        dense.gate_proj.weight.data, dense.up_proj.weight.data, dense.down_proj.weight.data, dense.act_fn
    )
    candidates = {"dense": dense}
    for top_k in range(1, n_experts):
        candidates[f"ideal K={top_k}"] = DenseFFN(hidden, ffn * top_k // n_experts).to(device, dtype).eval()
        for dispatch in dispatches:
            factored = build_factorized_ffn(weights, FactorConfig(n_experts, top_k), layer_seed=0).eval()
            factored.experts.dispatch = dispatch
            candidates[f"{dispatch} 1R{n_experts}E{top_k}K"] = factored
            if dispatch != "reference":
                check_close(f"{dispatch} vs reference, K={top_k}", with_dispatch(factored, "reference"), factored, x)
            if dispatch in GRAPH_SAFE and x.is_cuda:
                check_no_host_sync(f"{dispatch}, K={top_k}", factored, x)
    full = build_factorized_ffn(weights, FactorConfig(n_experts, n_experts), layer_seed=0).eval()
    check_close("K=N vs dense", dense, full, x)  # factorizing itself changes nothing
    return candidates, x


def with_dispatch(module, name):
    def run(x):
        saved, module.experts.dispatch = module.experts.dispatch, name
        try:
            return module(x)
        finally:
            module.experts.dispatch = saved

    return run


def check_close(what: str, expected_fn, got_fn, x) -> None:
    """Refuse to time anything whose output on x is wrong."""
    with torch.no_grad():
        bench_checks.check_close(what, expected_fn(x), got_fn(x), x.dtype)


def check_no_host_sync(what: str, module, x) -> None:
    with torch.no_grad():
        module(x)  # first call may initialise things that sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            module(x)
        except RuntimeError as error:
            raise SystemExit(f"host sync in {what}: {error}") from error
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"no host sync: {what}")


@torch.no_grad()
def run(candidates, x, repeats=15, warmup=3, inner=1, graphs=False):
    calls = {}
    for name, module in candidates.items():
        if graphs:
            if not (name == "dense" or name.startswith("ideal") or name.split()[0] in GRAPH_SAFE):
                continue
            calls[name] = cuda_graph(module, x)
        else:
            calls[name] = lambda module=module: module(x)
    measure = timer(x.device.type, inner)
    times = {name: [] for name in calls}
    for step in range(warmup + repeats):
        for name, call in calls.items():  # interleaved: noise hits all alike
            call()  # untimed: what the previous candidate left in caches and the allocator is not charged here
            elapsed = measure(call)
            if step >= warmup:
                times[name].append(elapsed)
    return times


def round_ratios(times: dict, name: str, base: str) -> list[float]:
    """name's time over base's, per round: each pair was timed back to back, so slow
    stretches of a shared machine cancel."""
    return [t / b for t, b in zip(times[name], times[base])]


def ratio(times: dict, name: str, base: str) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(round_ratios(times, name, base))


def spread(times: dict, name: str, base: str) -> str:
    """The middle half of the per-round ratios (first to third quartile), to show how
    far one run's median can be trusted; empty with fewer than 4 rounds."""
    ratios = round_ratios(times, name, base)
    if len(ratios) < 4:
        return ""
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{low:.2f}-{high:.2f}"


def table(times: dict, n_experts: int = 4) -> str:
    """times: seconds per round for each candidate (rounds aligned)."""
    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    lines = [
        "| variant | ms (median) | x dense | x ideal | x ideal, middle half of rounds |",
        "|---|---:|---:|---:|---:|",
        f"| dense | {ms['dense']:.3f} | 1.00 | | |",
    ]
    for top_k in range(1, n_experts):
        ideal = f"ideal K={top_k}"
        lines.append(f"| {ideal} | {ms[ideal]:.3f} | {ratio(times, ideal, 'dense'):.2f} | 1.00 | |")
        for name in times:
            if name.endswith(f"E{top_k}K"):  # one row per dispatch path
                lines.append(
                    f"| {name} | {ms[name]:.3f} | {ratio(times, name, 'dense'):.2f} | "
                    f"{ratio(times, name, ideal):.2f} | {spread(times, name, ideal)} |"
                )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-cpu")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (after 3 warm-up rounds)")
    parser.add_argument(
        "--inner", type=int, default=None, help="calls per timed sample (default: 1, or 50 below 1,024 tokens)"
    )
    parser.add_argument("--graphs", action="store_true", help="CUDA only: time CUDA-graph replays")
    parser.add_argument("--dispatch", help="comma-separated dispatch paths to time (default: all that run here)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} needs a CUDA device; none is available")
    if args.graphs and preset["device"] != "cuda":
        raise SystemExit("--graphs needs a CUDA preset")
    inner = args.inner or (50 if preset["tokens"] < 1024 else 1)
    print(
        f"preset {args.preset}: {preset}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"inner {inner}, graphs {args.graphs}"
    )
    dispatches = tuple(args.dispatch.split(",")) if args.dispatch else default_dispatches(preset["device"])
    candidates, x = build(**preset, dispatches=dispatches)
    print(table(run(candidates, x, repeats=args.repeats, inner=inner, graphs=args.graphs)))


if __name__ == "__main__":
    main()
