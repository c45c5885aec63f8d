import pytest
import torch

from factorllm_core import PSEUDO_LABELS, FactorConfig, RoutingStats, balance_loss, pa_loss
from factorllm_core.router import Routing


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(n_experts=4, top_k=5), r"top_k=5 must satisfy 1 <= top_k <= n_experts=4"),
        (dict(n_experts=4, top_k=0), r"top_k=0 must satisfy"),
        (dict(n_experts=0, top_k=1), r"n_experts: 0 must be >= 1"),
        (dict(n_experts=4, top_k=1, n_routers=0), r"n_routers: 0 must be >= 1"),
        (dict(n_experts=4, top_k=1.5), r"top_k=1.5 must be an integer"),
        (
            dict(n_experts=4, top_k=1, partition="kmeans"),
            r"partition='kmeans' is not a known partition; allowed: cluster, coact, contiguous, random",
        ),
        (
            dict(n_experts=4, top_k=1, combine="sum"),
            r"combine='sum' is not a known combine; allowed: mean_comp, scaled, unscaled, weighted",
        ),
        (
            dict(n_experts=4, top_k=1, router_mode="learned"),
            r"router_mode='learned' is not a known router mode; allowed: frozen, lm_only, par, random",
        ),
        (dict(n_experts=4, top_k=1, pseudo_label="oracle"), r"pseudo_label='oracle' is not a known"),
    ],
)
def test_invalid_config_names_field_value_and_allowed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FactorConfig(**kwargs)


def test_width_check_lists_allowed_expert_counts():
    with pytest.raises(ValueError, match=r"n_experts=5 does not divide the FFN width 1536 .*\[1, 2, 3, 4, 6, 8"):
        FactorConfig(n_experts=5, top_k=1).check_ffn_width(1536)


def test_config_is_frozen_and_round_trips():
    config = FactorConfig(n_experts=8, top_k=2, n_routers=2, partition="random")
    assert config.name == "2R8E2K"
    assert FactorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(AttributeError):
        config.top_k = 3
    with pytest.raises(ValueError, match=r"^topk: unknown key; allowed: combine, n_experts"):
        FactorConfig.from_dict({"n_experts": 4, "topk": 1})


def test_min_mse_labels_pick_the_experts_that_carry_the_teacher():
    # N=4, K=2: teacher = sum = 2a, so teacher/(N/K) = a. Experts 0 and 3 output a exactly;
    # experts 1 and 2 output +b and -b, far from a. Token 2 swaps the roles.
    a, b = torch.randn(8), 5 * torch.ones(8)
    token1 = torch.stack([a, b, -b, a])
    token2 = torch.stack([b, a, a, -b])
    labels = PSEUDO_LABELS.get("min_mse")(torch.stack([token1, token2]), 2)
    assert labels.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


def test_pa_loss_is_a_scalar_kl_minimised_at_the_label_distribution():
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    target = torch.softmax(labels, dim=-1)
    at_target = pa_loss(target.unsqueeze(1).expand(2, 3, 4), labels)  # (S, R, N)
    uniform = pa_loss(torch.full((2, 1, 4), 0.25), labels)
    assert at_target.ndim == 0 and at_target.abs() < 1e-6
    # KL(uniform || q) with q = e/(2e+2) on the labelled two, 1/(2e+2) on the others
    e = torch.e
    q1, q0 = e / (2 * e + 2), 1 / (2 * e + 2)
    expected = 0.5 * torch.log(torch.tensor(0.25 / q1)) + 0.5 * torch.log(torch.tensor(0.25 / q0))
    torch.testing.assert_close(uniform, expected)


def test_balance_loss_is_mean_of_masked_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    indices = torch.tensor([[0], [2]])
    torch.testing.assert_close(balance_loss(probs, indices), torch.tensor((0.7 + 0.8) / 6))


def test_routing_stats_load_entropy_and_agreement():
    # 2 routers that agree on token 0 and disagree on token 1 (K=1, N=2)
    router_probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.9, 0.1], [0.2, 0.8]]])
    probs = router_probs.mean(1)
    routing = Routing(router_probs, probs, probs.topk(1).indices, torch.ones(2, 1))
    stats = RoutingStats(n_experts=2, n_routers=2, top_k=1)
    stats.update(routing)
    stats.update(routing)
    summary = stats.summary()
    assert summary["tokens"] == 4
    assert summary["expert_load"] == [4, 0]  # token 1 averages to [0.55, 0.45]
    assert summary["load_max_over_mean"] == 2.0
    assert summary["router_agreement"] == pytest.approx(0.5)
    h = -(probs * probs.log()).sum(-1).mean().item()
    assert summary["routing_entropy"] == pytest.approx(h)


@pytest.mark.parametrize("n_routers,top_k", [(1, 1), (1, 2), (2, 1), (3, 3)])
def test_router_equals_the_plain_formula(n_routers, top_k):
    """The router computes its logits transposed (R, N, S) for speed; what it returns must
    be what the row-major formula gives: per-router softmax of x W^T + b, their mean,
    and the top-K of the mean, with gradients reaching the gate."""
    from factorllm_core.router import Router

    router = Router(
        hidden_size=24, n_experts=4, n_routers=n_routers, top_k=top_k, mode="par", combine="weighted", seed=0
    )
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(2))
    routing = router(x)
    expected_router = (
        torch.nn.functional.linear(x, router.gate.weight, router.gate.bias).view(37, n_routers, 4).softmax(-1)
    )
    expected = expected_router.mean(dim=1)
    torch.testing.assert_close(routing.router_probs, expected_router)
    torch.testing.assert_close(routing.probs, expected)
    assert torch.equal(routing.indices.sort(dim=1).values, expected.topk(top_k, dim=1).indices.sort(dim=1).values)
    assert routing.indices.shape == (37, top_k) and routing.weights.shape == (37, top_k)
    (routing.router_probs * torch.arange(4.0)).sum().backward()  # (the weights are constant at K = 1)
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
