"""Training goes through the dispatch too: check each trainable path's outputs and
gradients against the reference loop on this device, at realistic sizes.

    python perf/dispatch_grad_check.py            # CUDA bf16 if present, else CPU fp32

Relative error limits: 1e-5 in fp32, 1e-2 in bf16 (per tensor: output, grad of
x, of the combine weights, and of every expert weight). Exit 1 on any failure.
"""

from __future__ import annotations

import argparse

import torch
from bench_checks import relative_error, tolerance  # beside this script

from factorllm_core import DISPATCH, FactorConfig, build_factorized_ffn
from factorllm_core.factorize import GatedFFNWeights

SIZES = {
    "cuda": dict(hidden=2048, ffn=5632, tokens=4096, dtype=torch.bfloat16),
    "cpu": dict(hidden=576, ffn=1536, tokens=1024, dtype=torch.float32),
}


def grads(name, weights, config, x, indices, combine, probe):
    experts = build_factorized_ffn(weights, config, layer_seed=0).experts
    x = x.clone().requires_grad_(True)
    combine = combine.clone().requires_grad_(True)
    out = DISPATCH.get(name)(experts, x, indices, combine)
    (out.float() * probe).sum().backward()
    return [("output", out.detach()), ("grad x", x.grad), ("grad weights", combine.grad)] + [
        (f"grad {n}", p.grad) for n, p in experts.named_parameters()
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", default="sorted,grouped")
    args = parser.parse_args(argv)
    size = SIZES[args.device]
    torch.manual_seed(0)
    dev, dtype = args.device, size["dtype"]
    h, f, s = size["hidden"], size["ffn"], size["tokens"]
    weights = GatedFFNWeights(
        (torch.randn(f, h, device=dev) / h**0.5).to(dtype),
        (torch.randn(f, h, device=dev) / h**0.5).to(dtype),
        (torch.randn(h, f, device=dev) / f**0.5).to(dtype),
        torch.nn.SiLU(),
    )
    x = torch.randn(s, h, device=dev, dtype=dtype)
    probe = torch.randn(s, h, device=dev)
    limit = tolerance(dtype)
    failures = 0
    print(f"device {dev}, {dtype}, {s} tokens, hidden {h}, FFN {f}, limit {limit:.0e}")
    for top_k in (1, 2, 3):
        config = FactorConfig(4, top_k)
        indices = torch.rand(s, 4, device=dev).topk(top_k, dim=1).indices
        combine = (torch.rand(s, top_k, device=dev) + 0.5).to(dtype)
        expected = grads("reference", weights, config, x, indices, combine, probe)
        for path in args.paths.split(","):
            got = grads(path, weights, config, x, indices, combine, probe)
            worst = max(relative_error(e, g) for (_, e), (_, g) in zip(expected, got))
            ok = worst <= limit
            failures += not ok
            print(
                f"K={top_k} {path}: worst relative error {worst:.1e} over {len(got)} tensors {'ok' if ok else 'FAIL'}"
            )
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
