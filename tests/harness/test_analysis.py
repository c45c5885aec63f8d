"""Routing churn on scripted routing sequences (known answers), and on a real tiny model."""

import torch

from factorllm_core import FactorConfig, factorize
from harness.measure import analysis
from harness.measure.analysis import ChurnMonitor, chosen_experts, churn


def picks(*rows):
    """One layer, tokens x K chosen experts."""
    return torch.tensor([rows])


def test_churn_counts_tokens_whose_expert_set_changed():
    before = picks([0, 1], [2, 3], [0, 3], [1, 2])
    assert churn(before, before) == 0.0
    assert churn(before, picks([0, 1], [2, 3], [0, 2], [1, 3])) == 0.5
    two_layers = torch.stack([before[0], before[0]])
    assert churn(two_layers, torch.stack([before[0], picks([3, 1], [2, 3], [0, 3], [1, 2])[0]])) == 1 / 8


def test_monitor_series_on_a_scripted_routing_sequence(monkeypatch):
    script = iter(
        [
            picks([0], [1], [2], [3]),  # start
            picks([1], [1], [2], [3]),  # step 2: 1 of 4 changed
            picks([1], [0], [3], [3]),  # step 4: 2 of 4
            picks([1], [0], [3], [3]),  # step 6: none
            picks([2], [2], [2], [2]),
        ]
    )  # step 7 (last): all 4
    monkeypatch.setattr(analysis, "chosen_experts", lambda model, ids, device: next(script))
    monitor = ChurnMonitor(model=None, probe_ids=None, device="cpu", every=2)
    monitor.start()
    for step in range(1, 8):
        monitor.after_step(step, last=step == 7)
    assert monitor.series == [[2, 0.25], [4, 0.5], [6, 0.0], [7, 1.0]]
    resumed = ChurnMonitor(None, None, "cpu", 2)
    resumed.load_state(monitor.state())
    assert resumed.series == monitor.series and torch.equal(resumed.previous, monitor.previous)


def test_chosen_experts_on_a_model_keeps_its_mode(tiny_model_factory, token_ids):
    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    model.train()
    chosen = chosen_experts(model, token_ids[:1], "cpu")
    assert chosen.shape == (2, token_ids.shape[1], 2) and model.training
    assert (chosen[..., 0] < chosen[..., 1]).all()  # sorted sets
    with torch.no_grad():
        layer = [m for m in model.modules() if hasattr(m, "router")][0]
        layer.router.gate.bias += torch.tensor([100.0, 100.0, 0, 0])  # force experts {0, 1} in layer 0
    after = chosen_experts(model, token_ids[:1], "cpu")
    assert after[0].tolist() == [[0, 1]] * token_ids.shape[1]
    changed_in_layer_0 = int((chosen[0] != after[0]).any(-1).sum())
    assert changed_in_layer_0 > 0
    # layer 0's changes count over both layers' tokens; layer 1 may change too (its input moved)
    assert changed_in_layer_0 / 24 <= churn(chosen, after) <= (changed_in_layer_0 + 12) / 24
