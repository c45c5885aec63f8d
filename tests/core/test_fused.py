"""The opt-in Triton `fused` dispatch: its index logic is checked against the
reference on CPU through Triton's interpreter (TRITON_INTERPRET=1, fp32: the
interpreter's bf16 dot is broken); bf16 speed and accuracy need a GPU
(perf/ffn_dispatch.py checks them before timing)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dispatch_cases import make_experts, routing

from factorllm_core import DISPATCH

HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERPRETED_CHECK = textwrap.dedent("""
    import torch
    from factorllm_core import DISPATCH
    from dispatch_cases import make_experts, routing
    results = []
    # (experts, K, tokens, an expert given no token): partial tiles, empty experts, one token
    for n_experts, top_k, n_tokens, skip in [(4, 1, 150, 1), (4, 2, 150, None), (4, 3, 70, 0), (4, 2, 1, None),
                                             (8, 2, 130, 5)]:
        experts = make_experts(top_k=top_k, hidden=80, width=160, n_experts=n_experts)  # not tile multiples
        x = torch.randn(n_tokens, 80, generator=torch.Generator().manual_seed(top_k))
        indices, weights = routing(n_tokens, n_experts, top_k, skip_expert=skip)
        with torch.no_grad():
            expected = DISPATCH.get("reference")(experts, x, indices, weights)
            got = DISPATCH.get("fused")(experts, x, indices, weights)
        results.append(((expected - got).norm() / expected.norm()).item())
    print(results)
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_fused_kernels_equal_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED_CHECK],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = eval(done.stdout.strip().splitlines()[-1], {})  # a list of floats printed above
    assert len(errors) == 5 and all(e < 1e-5 for e in errors), errors


def test_fused_refuses_what_it_does_not_support():
    experts = make_experts(top_k=2)
    x = torch.randn(8, 48)
    indices, weights = routing(8, 4, 2)
    with pytest.raises(RuntimeError, match="inference only"):
        DISPATCH.get("fused")(experts, x, indices, weights)  # parameters require grad
    experts.act_fn = torch.nn.GELU()
    experts.gate_bias = torch.nn.Parameter(torch.zeros(4, experts.expert_width))
    with torch.no_grad(), pytest.raises(RuntimeError, match="biases.*GELU is not SiLU"):
        DISPATCH.get("fused")(experts, x, indices, weights)
