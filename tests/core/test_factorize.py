import pytest
import torch

from factorllm_core import (
    FactorConfig,
    collect_aux,
    factorize,
    factorized_layers,
    load_factorized,
    save_factorized,
    use_dispatch,
)


@pytest.mark.parametrize("partition", ["contiguous", "random", "cluster"])
def test_all_experts_active_equals_dense_model(family, tiny_model_factory, token_ids, partition):
    model = tiny_model_factory(family)
    with torch.no_grad():
        dense = model(token_ids).logits
    report = factorize(model, FactorConfig(n_experts=4, top_k=4, partition=partition))
    with torch.no_grad():
        factored = model(token_ids).logits
    assert (dense - factored).abs().max().item() <= 1e-5
    assert len(report.layers) == model.config.num_hidden_layers


def test_report_counts_parameters(tiny_model_factory):
    model = tiny_model_factory("llama")
    report = factorize(model, FactorConfig(n_experts=4, top_k=1, n_routers=2))
    layers = model.config.num_hidden_layers
    hidden, width = 64, 96
    assert report.setting == "2R4E1K"
    assert report.ffn_params == layers * 3 * hidden * width  # partition changes no weight
    assert report.router_params == layers * (hidden * 8 + 8)  # R*N gates with bias
    assert report.params_after == report.params_before + report.router_params
    assert report.active_ffn_params_per_token == report.ffn_params // 4 + report.router_params


def count_expert_tokens(model, monkeypatch):
    """Wrap every expert call; return {(layer, expert): tokens}."""
    counts = {}
    for name, layer in factorized_layers(model):
        original = layer.experts.expert_forward

        def counting(expert, x, *args, _name=name, _original=original, **kwargs):
            counts[(_name, expert)] = counts.get((_name, expert), 0) + x.shape[0]
            return _original(expert, x, *args, **kwargs)

        monkeypatch.setattr(layer.experts, "expert_forward", counting)
    return counts


@pytest.mark.parametrize("dispatch", ["reference", "sorted"])
def test_unselected_experts_do_no_work(family, tiny_model_factory, token_ids, monkeypatch, dispatch):
    model = tiny_model_factory(family)
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    for _, layer in factorized_layers(model):  # every token prefers experts 1 and 3
        layer.router.gate.bias.data = torch.tensor([0.0, 50.0, 0.0, 40.0])
        layer.experts.dispatch = dispatch
    counts = count_expert_tokens(model, monkeypatch)
    with torch.no_grad():
        model(token_ids)
    n_tokens = token_ids.numel()
    for name, _ in factorized_layers(model):
        assert counts.get((name, 0), 0) == 0 and counts.get((name, 2), 0) == 0
        assert counts[(name, 1)] == n_tokens and counts[(name, 3)] == n_tokens


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_runs_exactly_k_experts(family, tiny_model_factory, token_ids, monkeypatch, top_k):
    model = tiny_model_factory(family)
    factorize(model, FactorConfig(n_experts=4, top_k=top_k, n_routers=2))
    counts = count_expert_tokens(model, monkeypatch)
    with torch.no_grad(), collect_aux(model) as collector:
        model(token_ids)
    assert len(collector.records) == model.config.num_hidden_layers
    for name, aux in collector.records:
        indices = aux.routing.indices
        assert indices.shape == (token_ids.numel(), top_k)
        assert all(len(set(row)) == top_k for row in indices.tolist())
        assert sum(v for (n, _), v in counts.items() if n == name) == token_ids.numel() * top_k
        load = torch.bincount(indices.flatten(), minlength=4).tolist()
        assert [counts.get((name, e), 0) for e in range(4)] == load


@pytest.mark.parametrize("combine", ["scaled", "weighted"])
def test_par_losses_are_finite_and_reach_routers_and_experts(tiny_model_factory, token_ids, combine):
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2, combine=combine))
    model.train()
    with collect_aux(model) as collector:
        out = model(token_ids, labels=token_ids)
    pa, balance = collector.pa_loss(), collector.balance_loss()
    assert pa.ndim == 0 and balance.ndim == 0
    loss = out.loss + 0.05 * pa + 0.01 * balance
    assert torch.isfinite(loss)
    loss.backward()
    for _, layer in factorized_layers(model):
        assert layer.router.gate.weight.grad.abs().sum() > 0
        assert layer.experts.gate_weight.grad.abs().sum() > 0
        assert layer.experts.down_weight.grad.abs().sum() > 0


def test_training_forward_matches_sparse_inference(tiny_model_factory, token_ids):
    """The teacher path (all experts, gathered) must give the same output as sparse dispatch."""
    model = tiny_model_factory("qwen2")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    layer = factorized_layers(model)[0][1]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        sparse, _ = layer.eval().forward_with_aux(x)
        gathered, aux = layer.train().forward_with_aux(x)
    assert aux.pa_loss is not None and aux.pseudo_labels.sum(-1).eq(2).all()
    torch.testing.assert_close(gathered, sparse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,router_grad", [("frozen", False), ("random", False), ("lm_only", True)])
def test_router_modes(tiny_model_factory, token_ids, mode, router_grad):
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2, router_mode=mode, combine="weighted"))
    model.train()
    with collect_aux(model) as collector:
        out = model(token_ids, labels=token_ids)
    assert collector.pa_loss() is None  # only `par` runs the teacher
    out.loss.backward()
    layer = factorized_layers(model)[0][1]
    assert (layer.router.gate.weight.grad is not None) == router_grad
    assert layer.experts.up_weight.grad.abs().sum() > 0


def test_random_routing_is_seeded_and_ignores_router_scores(tiny_model_factory):
    picks = []
    for _ in range(2):
        model = tiny_model_factory("llama")
        factorize(model, FactorConfig(n_experts=4, top_k=1, router_mode="random", seed=5))
        layer = factorized_layers(model)[0][1]
        layer.router.gate.bias.data = torch.tensor([100.0, 0, 0, 0])  # would always pick 0
        with torch.no_grad():
            _, aux = layer.forward_with_aux(torch.randn(400, 64))
        picks.append(aux.routing.indices.flatten())
    assert torch.equal(picks[0], picks[1])
    assert torch.bincount(picks[0], minlength=4).min() > 50  # roughly uniform, not all expert 0


@pytest.mark.parametrize("family_name", ["llama", "gemma3"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_model_factory, token_ids, family_name):
    model = tiny_model_factory(family_name)
    config = FactorConfig(n_experts=4, top_k=2, n_routers=2, partition="cluster", seed=7)
    factorize(model, config)
    for _, layer in factorized_layers(model):  # make sure trained-looking weights survive
        layer.router.gate.weight.data.normal_()
        layer.experts.up_weight.data.mul_(1.5)
    with torch.no_grad():
        before = model(token_ids).logits
    save_factorized(model, tmp_path / "ckpt")
    loaded = load_factorized(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded(token_ids).logits
    assert torch.equal(before, after)
    assert factorized_layers(loaded)[0][1].config == config
    original_index = factorized_layers(model)[1][1].experts.neuron_index
    assert torch.equal(factorized_layers(loaded)[1][1].experts.neuron_index, original_index)


def test_factorize_rejects_width_not_divisible(tiny_model_factory):
    model = tiny_model_factory("llama")  # FFN width 96
    with pytest.raises(ValueError, match=r"n_experts=5 does not divide the FFN width 96"):
        factorize(model, FactorConfig(n_experts=5, top_k=1))


def test_factorize_rejects_model_without_gated_ffn():
    with pytest.raises(ValueError, match="no gated FFN found"):
        factorize(torch.nn.Sequential(torch.nn.Linear(4, 4)), FactorConfig(n_experts=2, top_k=1))


@pytest.mark.parametrize("partition", ["random", "cluster"])
def test_defactorize_merges_experts_back_into_the_dense_model(family, tiny_model_factory, token_ids, partition):
    import copy

    from factorllm_core import defactorize

    model = tiny_model_factory(family)
    with torch.no_grad():
        dense = model(token_ids).logits
    factorize(model, FactorConfig(n_experts=4, top_k=1, partition=partition))
    merged = defactorize(copy.deepcopy(model))
    assert not factorized_layers(merged)
    with torch.no_grad():
        assert (merged(token_ids).logits - dense).abs().max().item() <= 1e-5
    for _, layer in factorized_layers(model):  # trained experts: the merge follows their weights
        layer.experts.up_weight.data.mul_(2)
    merged = defactorize(copy.deepcopy(model))
    first = merged.model.layers[0].mlp
    original = factorized_layers(model)[0][1].experts
    order = original.neuron_index.flatten().argsort()
    torch.testing.assert_close(first.up_proj.weight, original.up_weight.reshape(-1, 64)[order])


@pytest.mark.parametrize("combine", ["scaled", "weighted"])
@pytest.mark.parametrize("dispatch", ["reference", "sorted", "grouped"])
def test_lm_only_router_gets_the_lm_gradient_under_every_combine(tiny_model_factory, token_ids, combine, dispatch):
    """lm_only has no PA term: the LM loss alone must reach the router (straight-through
    weights under `scaled`), on every dispatch path, and the output is unchanged."""
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2, router_mode="lm_only", combine=combine))
    with torch.no_grad():
        inference = model(token_ids).logits
    model.train()
    with use_dispatch(model, dispatch):
        out = model(token_ids, labels=token_ids)
    torch.testing.assert_close(out.logits, inference, rtol=1e-5, atol=1e-5)  # same forward value
    out.loss.backward()  # the LM loss only: no balance or PA term
    for _, layer in factorized_layers(model):
        assert layer.router.gate.weight.grad is not None
        assert layer.router.gate.weight.grad.abs().sum() > 0


def test_scaled_combine_gives_par_routers_no_lm_gradient(tiny_model_factory, token_ids):
    """Without straight-through (par), the hard N/K mask carries no LM gradient: the PA
    loss is what trains a par router (the released code's design)."""
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2, router_mode="par", combine="scaled"))
    model.train()
    out = model(token_ids, labels=token_ids)
    out.loss.backward()
    grads = [layer.router.gate.weight.grad for _, layer in factorized_layers(model)]
    assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_router_losses_are_summed_over_layers(tiny_model_factory, token_ids):
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    model.train()
    with collect_aux(model) as collector:
        model(token_ids, labels=token_ids)
    per_layer = [aux.pa_loss for _, aux in collector.records]
    assert len(per_layer) == 2
    torch.testing.assert_close(collector.pa_loss(), per_layer[0] + per_layer[1])
    torch.testing.assert_close(collector.balance_loss(), sum(aux.balance_loss for _, aux in collector.records))
