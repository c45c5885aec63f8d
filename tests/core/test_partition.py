import pytest
import torch

from factorllm_core import PARTITIONS


@pytest.mark.parametrize("name", PARTITIONS.names())
@pytest.mark.parametrize("n_experts", [1, 2, 4, 8])
def test_partition_is_disjoint_equal_and_complete(name, n_experts):
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(96, 32, generator=g), torch.randn(96, 32, generator=g)
    groups = PARTITIONS.get(name)(gate, up, n_experts, seed=3)
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
