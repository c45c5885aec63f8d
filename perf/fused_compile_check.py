"""Compile the `fused` dispatch's Triton kernels for a GPU architecture, on any machine.

    python perf/fused_compile_check.py              # Hopper (H100/H200, sm_90), TinyLlama sizes
    python perf/fused_compile_check.py --arch 80    # Ampere (A100)

No GPU is needed: Triton compiles ahead of time down to a cubin with the ptxas it
ships. Every autotune config of both kernels is compiled with the specialisation
a real launch gets (16-byte aligned pointers; hidden size and expert width
divisible by 16 when they are), and each must:
- compile at all (a kernel that only runs in the CPU interpreter would not);
- use the architecture's tensor-core instruction (wgmma on sm_90 when BLOCK_M >= 64);
- be software-pipelined: loads issued as async copies, so memory overlaps the dots;
- fit the architecture's shared memory per block (a config that does not is
  skipped by the autotuner at run time, silently wasting a slot).
One row per (kernel, config); exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

# Shared memory one block may use (opt-in maximum), bytes, per compute capability.
SHARED_LIMIT = {80: 166912, 90: 232448}
# What a real launch passes: index pointers int32, combine scales fp32, data in the model dtype.
POINTER_TYPES = {
    "token_ptr": "*i32",
    "order_ptr": "*i32",
    "counts_ptr": "*i32",
    "starts_ptr": "*i32",
    "scale_ptr": "*fp32",
}
INT_ARGS = ("H", "W", "M_BUCKET")
# Checked: 3.4, 3.6 (the H200 image's) and 3.9 compile without a driver; 3.2 and 3.3 do not.
MIN_TRITON = (3, 4)


@dataclass
class Compiled:
    kernel: str
    config: dict
    num_warps: int
    num_stages: int
    shared: int
    tensor_cores: bool
    pipelined: bool
    problems: list[str]


def signature(kernel, dtype: str) -> dict[str, str]:
    """Argument types of one kernel, from its argument names."""
    types = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            types[name] = POINTER_TYPES.get(name, f"*{dtype}")
        elif name in INT_ARGS:
            types[name] = "i32"
        elif name.isupper():
            types[name] = "constexpr"
        else:
            raise SystemExit(
                f"fused_compile_check: unknown argument {name!r} of {kernel.__name__}; "
                "add its type to POINTER_TYPES or INT_ARGS"
            )
    return types


def compile_one(kernel, config, arch: int, hidden: int, width: int, n_experts: int, dtype: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = signature(kernel, dtype)
    sizes = {"H": hidden, "W": width, "M_BUCKET": 1 << 14}
    aligned = [
        i
        for i, name in enumerate(kernel.arg_names)
        if name.endswith("_ptr") or (name in sizes and sizes[name] % 16 == 0)
    ]
    source = ASTSource(
        fn=kernel,
        signature=types,
        constexprs={"N_EXPERTS": n_experts, **config.kwargs},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    name = kernel.__name__.lstrip("_")
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # report every config, not just the first failure
        return Compiled(
            name,
            config.kwargs,
            config.num_warps,
            config.num_stages,
            0,
            False,
            False,
            [f"does not compile: {type(error).__name__}: {str(error)[:300]}"],
        )
    ttgir = compiled.asm["ttgir"]
    tensor_cores = bool(re.search(r"warp_group_dot|nvidia_mma", ttgir))
    pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    problems = []
    wants_wgmma = arch >= 90 and config.kwargs["BLOCK_M"] >= 64
    if wants_wgmma and "warp_group_dot" not in ttgir:
        problems.append("no wgmma")
    if not tensor_cores:
        problems.append("no tensor-core dot")
    if not pipelined:
        problems.append("loads are not pipelined")
    if compiled.metadata.shared > SHARED_LIMIT[arch]:
        problems.append(f"needs {compiled.metadata.shared} B shared memory > {SHARED_LIMIT[arch]}")
    return Compiled(
        name,
        config.kwargs,
        config.num_warps,
        config.num_stages,
        compiled.metadata.shared,
        tensor_cores,
        pipelined,
        problems,
    )


def check(
    arch: int = 90, hidden: int = 2048, ffn: int = 5632, n_experts: int = 4, dtype: str = "bf16", configs=None
) -> list[Compiled]:
    """Compile both kernels for every config (default: the autotune list)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("fused_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < MIN_TRITON:
        raise SystemExit(
            f"fused_compile_check: needs Triton >= {'.'.join(map(str, MIN_TRITON))} "
            f"(found {triton.__version__}); older ones want a GPU driver to compile"
        )
    from factorllm_core import fused_kernels

    configs = fused_kernels.CONFIGS if configs is None else configs
    width = ffn // n_experts
    return [
        compile_one(kernel, config, arch, hidden, width, n_experts, dtype)
        for kernel in (fused_kernels._gate_up, fused_kernels._down)
        for config in configs
    ]


def table(results: list[Compiled]) -> str:
    lines = [
        "| kernel | BLOCK_M,N,K | warps | stages | shared KiB | tensor cores | pipelined | problems |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        tiles = ",".join(str(r.config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        lines.append(
            f"| {r.kernel} | {tiles} | {r.num_warps} | {r.num_stages} | {r.shared / 1024:.0f} | "
            f"{'yes' if r.tensor_cores else 'no'} | {'yes' if r.pipelined else 'no'} | "
            f"{'; '.join(r.problems) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch",
        type=int,
        choices=sorted(SHARED_LIMIT),
        default=90,
        help="compute capability x 10 (90: H100/H200, 80: A100)",
    )
    parser.add_argument("--hidden", type=int, default=2048, help="model hidden size (TinyLlama: 2048)")
    parser.add_argument("--ffn", type=int, default=5632, help="dense FFN width (TinyLlama: 5632)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args(argv)
    import triton

    print(
        f"triton {triton.__version__}, sm_{args.arch}, hidden {args.hidden}, expert width "
        f"{args.ffn // args.experts}, {args.dtype}"
    )
    results = check(args.arch, args.hidden, args.ffn, args.experts, args.dtype)
    print(table(results))
    failed = [r for r in results if r.problems]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} compiled kernels have problems (see the table)")
    print(f"all {len(results)} compiled kernels pass")


if __name__ == "__main__":
    main()
