"""Calibrated conversions: calibration pass, shared experts, coact, mean_comp and
unscaled combines, min_recon labels and fitted router initialisation."""

import itertools

import pytest
import torch
from conftest import CALIBRATED

from factorllm_core import (
    PSEUDO_LABELS,
    ROUTER_INITS,
    FactorConfig,
    LabelContext,
    Router,
    calibrate,
    collect_aux,
    defactorize,
    factorize,
    factorized_layers,
    load_factorized,
    save_factorized,
)


def sequences(n=3, length=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def calibrated(model, config, seqs=None):
    calibration = calibrate(model, seqs or sequences(), "cpu")
    return factorize(model, config, calibration)


# Every calibrated option at K = N (all routed experts chosen, shared ones on) is the dense model.
FULL = [
    dict(n_experts=4, top_k=4, combine="unscaled"),
    dict(n_experts=4, top_k=4, combine="mean_comp"),
    dict(n_experts=3, top_k=3, n_shared=1, combine="unscaled", partition="coact"),
    CALIBRATED | {"n_experts": 2, "top_k": 2, "n_shared": 2},  # every calibrated option at K = N
    dict(n_experts=3, top_k=3, n_shared=1, combine="scaled", partition="cluster"),
]


@pytest.mark.parametrize("options", FULL, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_k_equals_n_reproduces_the_dense_model(family, tiny_model_factory, token_ids, options):
    model = tiny_model_factory(family)
    with torch.no_grad():
        dense = model(token_ids).logits
    calibrated(model, FactorConfig(**options))
    with torch.no_grad():
        factored = model(token_ids).logits
    assert (dense - factored).abs().max().item() <= 1e-5


def test_mean_comp_adds_the_unchosen_experts_calibration_means(tiny_model_factory):
    model = tiny_model_factory("llama")
    calibrated(model, FactorConfig(n_experts=4, top_k=1, combine="mean_comp"))
    _, layer = factorized_layers(model)[0]
    assert layer.unchosen_mean.abs().sum() > 0  # filled from calibration
    x = torch.randn(5, 64)
    with torch.no_grad():
        routing = layer.router(x)
        outputs = layer.experts.all_outputs(x)  # (5, 4, 64)
        want = torch.stack(
            [
                outputs[t, routing.indices[t, 0]]
                + layer.unchosen_mean.sum(0)
                - layer.unchosen_mean[routing.indices[t, 0]]
                for t in range(5)
            ]
        )
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_shared_experts_always_run_and_show_in_name_report_and_merge(tiny_model_factory, token_ids):
    model = tiny_model_factory("llama")
    with torch.no_grad():
        dense = model(token_ids).logits
    report = calibrated(model, FactorConfig(n_experts=3, top_k=1, n_shared=1, combine="unscaled"))
    assert report.setting == "1R3E1K1S" and report.n_shared == 1
    assert report.active_ffn_fraction == 0.5
    layers = model.config.num_hidden_layers
    assert report.ffn_params == layers * 3 * 64 * 96  # shared + routed = the dense FFN's neurons
    assert report.active_ffn_params_per_token == report.ffn_params // 2 + report.router_params
    for _, layer in factorized_layers(model):
        assert layer.shared.neuron_index.shape == (1, 24) and layer.experts.neuron_index.shape == (3, 24)
        every = torch.cat([layer.shared.neuron_index.flatten(), layer.experts.neuron_index.flatten()])
        assert torch.equal(every.sort().values, torch.arange(96))
    defactorize(model)  # all experts, shared included, merged back: the dense model
    with torch.no_grad():
        assert (model(token_ids).logits - dense).abs().max().item() <= 1e-5


def test_calibration_is_deterministic_and_keeps_every_ffn_input(tiny_model_factory):
    model = tiny_model_factory("llama")
    a, b = calibrate(model, sequences(), "cpu"), calibrate(model, sequences(), "cpu")
    assert a.tokens == 48 and list(a.inputs) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(torch.equal(a.inputs[k], b.inputs[k]) and a.inputs[k].shape == (48, 64) for k in a.inputs)
    other = calibrate(model, sequences(seed=3), "cpu")
    assert not torch.equal(a.inputs["model.layers.0.mlp"], other.inputs["model.layers.0.mlp"])
    c1 = FactorConfig(n_experts=4, top_k=2, partition="coact", combine="mean_comp", router_init="fit")
    m1, m2 = tiny_model_factory("llama"), tiny_model_factory("llama")
    factorize(m1, c1, a)
    factorize(m2, c1, b)
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize(
    "options",
    [dict(partition="coact"), dict(n_shared=1, n_experts=3), dict(combine="mean_comp"), dict(router_init="fit")],
)
def test_options_that_need_calibration_refuse_to_build_without(tiny_model_factory, options):
    config = FactorConfig(**({"n_experts": 4, "top_k": 1} | options))
    assert config.needs_calibration
    with pytest.raises(ValueError, match="needs calibration inputs"):
        factorize(tiny_model_factory("llama"), config)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(n_experts=4, top_k=1, n_shared=-1), r"n_shared: -1 must be >= 0"),
        (
            dict(n_experts=4, top_k=1, router_init="kmeans"),
            r"router_init='kmeans' is not a known router init; "
            r"allowed: fit, random",
        ),
        (dict(n_experts=4, top_k=1, router_init="fit", router_mode="random"), r"never uses"),
        (dict(n_experts=32, top_k=16, pseudo_label="min_recon"), r"C\(32, 16\) = 601,080,390 exceeds"),
    ],
)
def test_new_options_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FactorConfig(**kwargs)


def test_shared_width_must_divide_the_ffn(tiny_model_factory):
    with pytest.raises(ValueError, match=r"n_experts \+ n_shared = 4 \+ 1 = 5 does not divide the FFN width"):
        calibrated(tiny_model_factory("llama"), FactorConfig(n_experts=4, top_k=1, n_shared=1))


def test_min_recon_finds_the_planted_best_subset():
    # Token 0: experts 1 and 3 carry the output, 0 and 2 cancel each other. Token 1: 0 and 2 carry it.
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(2, 8, generator=g)
    outputs = torch.zeros(2, 4, 8)
    outputs[0, 1], outputs[0, 3], outputs[0, 0], outputs[0, 2] = v, w, 3 * w, -3 * w
    outputs[1, 0], outputs[1, 2] = v, w
    unscaled = LabelContext(chosen_weight=1.0)
    labels = PSEUDO_LABELS.get("min_recon")(outputs, 2, unscaled)
    assert labels.tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    # brute force agrees (up to ties), under the scaled rule (x2) and with unchosen means added
    means = torch.randn(4, 8, generator=g)
    for context in (LabelContext(2.0), LabelContext(1.0, means)):
        labels = PSEUDO_LABELS.get("min_recon")(outputs, 2, context)
        for t in range(2):

            def error(subset, context=context, t=t):
                y = context.chosen_weight * outputs[t, list(subset)].sum(0)
                if context.unchosen_mean is not None:
                    y = y + context.unchosen_mean[[e for e in range(4) if e not in subset]].sum(0)
                return float((y - outputs[t].sum(0)).pow(2).sum())

            errors = sorted(error(s) for s in itertools.combinations(range(4), 2))
            assert errors[0] < errors[-1]  # the subsets do differ
            assert error(labels[t].nonzero().flatten().tolist()) <= errors[0] + 1e-5


def test_fitted_router_recovers_a_planted_routing():
    # Labels follow a linear rule of the inputs (expert e when x . d_e is largest):
    # the fitted router must recover it on tokens it was not fitted on; a random one does not.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    directions = torch.randn(16, 4, generator=g)
    labels = torch.zeros(2000, 4).scatter_(1, (x @ directions).topk(2, dim=1).indices, 1.0)
    router = Router(16, 4, 1, 2, "par", "unscaled", seed=0)
    report = ROUTER_INITS.get("fit")(router, x, labels, 0)
    assert report["heldout_overlap"] > 0.9 and report["chance_overlap"] == 0.5
    fresh = torch.randn(500, 16, generator=g)
    want = (fresh @ directions).topk(2, dim=1).indices.sort(1).values
    with torch.no_grad():
        got = router(fresh).indices.sort(1).values
    assert (got == want).all(1).float().mean() > 0.85
    ROUTER_INITS.get("random")(router, None, None, 0)
    with torch.no_grad():
        assert (router(fresh).indices.sort(1).values == want).all(1).float().mean() < 0.5


def test_router_fit_on_a_real_layer_beats_chance_and_is_reported(tiny_model_factory):
    model = tiny_model_factory("llama")
    report = calibrated(
        model,
        FactorConfig(n_experts=4, top_k=1, router_init="fit", pseudo_label="min_recon", combine="unscaled"),
        sequences(n=8, length=64),
    )
    fit = report.router_fit
    assert set(fit) >= {"heldout_overlap", "fit_overlap", "chance_overlap"} and fit["chance_overlap"] == 0.25
    assert fit["fit_overlap"] > 0.5


def test_calibrated_model_trains_and_round_trips(tmp_path, tiny_model_factory, token_ids):
    model = tiny_model_factory("llama")
    config = FactorConfig(**CALIBRATED)
    calibrated(model, config)
    model.train()
    with collect_aux(model) as aux:
        loss = model(input_ids=token_ids, labels=token_ids).loss + aux.pa_loss()
    loss.backward()
    _, layer = factorized_layers(model)[0]
    assert layer.shared.gate_weight.grad is not None and layer.router.gate.weight.grad is not None
    model.eval()
    with torch.no_grad():
        before = model(token_ids).logits
    loaded = load_factorized(save_factorized(model, tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, before)


def test_fitted_router_on_a_toy_layer_picks_the_planted_best_expert():
    """A gated FFN of 4 one-neuron experts whose gate and up rows are 4 directions and
    whose down columns are orthogonal: for K = 1 the best expert (min_recon, unscaled)
    is the neuron with the largest |silu(z) z|, z = direction . x. Built through
    build_factorized_ffn with router_init fit on calibration inputs, the router must
    pick it on fresh inputs far above a random router."""
    from factorllm_core.factorize import GatedFFNWeights, build_factorized_ffn

    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) * 3
    weights = GatedFFNWeights(directions.clone(), directions.clone(), torch.eye(16, 4), torch.nn.SiLU())
    config = FactorConfig(n_experts=4, top_k=1, combine="unscaled", router_init="fit", pseudo_label="min_recon")
    layer = build_factorized_ffn(weights, config, layer_seed=0, calibration_inputs=torch.randn(3000, 16, generator=g))
    assert layer.fit_report["heldout_overlap"] > 0.8
    fresh = torch.randn(1000, 16, generator=g)
    z = fresh @ directions.t()
    best = (torch.nn.functional.silu(z) * z).abs().argmax(dim=1)
    with torch.no_grad():
        assert (layer.router(fresh).indices[:, 0] == best).float().mean() > 0.8
        random_layer = build_factorized_ffn(weights, FactorConfig(n_experts=4, top_k=1, combine="unscaled"), 0)
        assert (random_layer.router(fresh).indices[:, 0] == best).float().mean() < 0.5
