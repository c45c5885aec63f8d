import pytest
import torch

from factorllm_core import PARTITIONS
from factorllm_core.partition import shared_neurons


@pytest.mark.parametrize("name", PARTITIONS.names())
@pytest.mark.parametrize("n_experts", [1, 2, 4, 8])
def test_partition_is_disjoint_equal_and_complete(name, n_experts):
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(96, 32, generator=g), torch.randn(96, 32, generator=g)
    activations = torch.randn(50, 96, generator=g)  # calibration tokens x neurons (coact uses them)
    groups = PARTITIONS.get(name)(gate, up, n_experts, seed=3, activations=activations)
    assert groups.shape == (n_experts, 96 // n_experts)
    assert torch.equal(groups.flatten().sort().values, torch.arange(96))  # disjoint + complete
    assert torch.equal(groups, groups.sort(dim=1).values)


def test_contiguous_matches_released_slicing():
    groups = PARTITIONS.get("contiguous")(torch.zeros(12, 4), torch.zeros(12, 4), 3, seed=0)
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_random_partition_is_seeded():
    gate = torch.zeros(64, 4)
    a = PARTITIONS.get("random")(gate, gate, 4, seed=1)
    b = PARTITIONS.get("random")(gate, gate, 4, seed=1)
    c = PARTITIONS.get("random")(gate, gate, 4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cluster_recovers_planted_clusters():
    # 4 well-separated groups of 8 neurons, interleaved: cluster must find them, contiguous would not.
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(32) % 4
    gate = centres[labels] + 0.01 * torch.randn(32, 16, generator=g)
    groups = PARTITIONS.get("cluster")(gate, gate.clone(), 4, seed=0)
    found = sorted(sorted(labels[row].tolist()) for row in groups)
    assert found == [[k] * 8 for k in range(4)]


def test_coact_groups_neurons_that_fire_on_the_same_tokens():
    # 4 groups of 8 neurons, interleaved; each group fires on its own quarter of 64 tokens.
    # The weights carry no sign of the groups: only the activations do.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 4
    fires = (torch.arange(64)[:, None] // 16) == labels[None, :]  # (tokens, neurons)
    activations = fires * (1 + torch.rand(64, 32, generator=g)) + 0.01 * torch.randn(64, 32, generator=g)
    gate = torch.randn(32, 8, generator=g)
    groups = PARTITIONS.get("coact")(gate, gate, 4, seed=0, activations=activations)
    assert sorted(sorted(labels[row].tolist()) for row in groups) == [[k] * 8 for k in range(4)]
    weight_clusters = PARTITIONS.get("cluster")(gate, gate, 4, seed=0)
    assert sorted(sorted(labels[row].tolist()) for row in weight_clusters) != [[k] * 8 for k in range(4)]


def test_coact_without_calibration_says_what_to_set():
    with pytest.raises(ValueError, match="calibration_tokens"):
        PARTITIONS.get("coact")(torch.zeros(8, 4), torch.zeros(8, 4), 2, seed=0)


def test_shared_neurons_are_the_largest_mean_contributions():
    activations = torch.ones(10, 6) * torch.tensor([1.0, 5.0, 0.1, 3.0, 2.0, 0.5])
    down = torch.ones(4, 6)
    down[:, 4] = 10.0  # neuron 4: small activation, large output column: 2 x 20 = 40 beats neuron 1's 5 x 2
    assert shared_neurons(activations, down, 2).tolist() == [1, 4]
    assert shared_neurons(-activations, down, 2).tolist() == [1, 4]  # magnitude, not sign
