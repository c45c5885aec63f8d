"""The fast dispatch against the plain reference loop: outputs and gradients."""

import pytest
import torch

from factorllm_core import DISPATCH, FactorConfig, build_factorized_ffn
from factorllm_core.factorize import GatedFFNWeights


def make_experts(seed=0, hidden=48, width=96, n_experts=4, top_k=2):
    g = torch.Generator().manual_seed(seed)
    weights = GatedFFNWeights(torch.randn(width, hidden, generator=g) / 7, torch.randn(width, hidden, generator=g) / 7,
                              torch.randn(hidden, width, generator=g) / 10, torch.nn.SiLU())
    return build_factorized_ffn(weights, FactorConfig(n_experts, top_k), layer_seed=0).experts


def routing(n_tokens, n_experts, top_k, seed=1, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, n_experts, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1  # an expert that receives no token at all
    indices = scores.topk(top_k, dim=1).indices
    weights = torch.rand(n_tokens, top_k, generator=g) + 0.5
    return indices, weights


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("skip_expert", [None, 2])
def test_sorted_equals_reference_forward_and_backward(top_k, skip_expert):
    outputs, grads = {}, {}
    for name in ("reference", "sorted"):
        experts = make_experts(top_k=top_k)
        x = torch.randn(37, 48, generator=torch.Generator().manual_seed(5), requires_grad=True)
        indices, weights = routing(37, 4, top_k, skip_expert=skip_expert)
        weights.requires_grad_(True)
        out = DISPATCH.get(name)(experts, x, indices, weights)
        (out * torch.linspace(-1, 1, 48)).sum().backward()
        outputs[name] = out.detach()
        grads[name] = [x.grad, weights.grad] + [p.grad for p in experts.parameters()]
    torch.testing.assert_close(outputs["sorted"], outputs["reference"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["sorted"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_uses_the_fast_path_and_reference_stays_selectable(monkeypatch):
    experts = make_experts()
    calls = []
    monkeypatch.setitem(DISPATCH._items, "sorted", lambda *a: calls.append("sorted") or a[1])
    experts(torch.zeros(3, 48), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert calls == ["sorted"]
    experts.dispatch = "reference"
    experts(torch.zeros(3, 48), torch.tensor([[0, 1]] * 3), torch.ones(3, 2))
    assert calls == ["sorted"]
