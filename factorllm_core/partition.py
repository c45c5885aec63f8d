"""Partition an FFN's intermediate neurons into N equal, disjoint expert groups.

Every strategy takes the FFN's gate and up weights, each (ffn_width, hidden), and
(when the trial ran a calibration pass) the neurons' activations on calibration
tokens, (tokens, ffn_width); it returns a LongTensor (n_experts, ffn_width // n_experts) whose rows are sorted
neuron indices. Rows are disjoint and together cover every neuron exactly once,
so the sum of all experts equals the dense FFN whatever the strategy.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .registry import Registry


class PartitionFn(Protocol):
    def __call__(
        self,
        gate_weight: torch.Tensor,
        up_weight: torch.Tensor,
        n_experts: int,
        seed: int,
        activations: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


PARTITIONS: Registry[PartitionFn] = Registry("partition")


def _groups_from_order(order: torch.Tensor, n_experts: int) -> torch.Tensor:
    groups = order.reshape(n_experts, -1)
    return groups.sort(dim=1).values


@PARTITIONS.register("contiguous")
def contiguous(gate_weight, up_weight, n_experts, seed, activations=None):
    """The released code's slicing: expert j owns neurons [j*I/N, (j+1)*I/N)."""
    return _groups_from_order(torch.arange(gate_weight.shape[0]), n_experts)


@PARTITIONS.register("random")
def random(gate_weight, up_weight, n_experts, seed, activations=None):
    """A seeded random permutation cut into N equal groups."""
    generator = torch.Generator().manual_seed(seed)
    return _groups_from_order(torch.randperm(gate_weight.shape[0], generator=generator), n_experts)


@PARTITIONS.register("cluster")
def cluster(gate_weight, up_weight, n_experts, seed, activations=None):
    """Balanced k-means of neurons on their [gate | up] weight rows (MoEfication-style)."""
    points = torch.cat([gate_weight, up_weight], dim=1).detach().float().cpu()  # (ffn_width, 2*hidden)
    return _groups_from_order(_balanced_kmeans(points, n_experts, seed), n_experts)


@PARTITIONS.register("coact")
def coact(gate_weight, up_weight, n_experts, seed, activations=None):
    """Balanced k-means of neurons on their activation patterns over calibration tokens
    (|activation| per token, unit-normalised per neuron): neurons that fire on the
    same tokens share an expert, so a token's useful neurons sit in few experts."""
    if activations is None:
        raise ValueError("partition='coact' clusters calibration activations: set train.calibration_tokens > 0")
    points = activations.detach().float().abs().t().cpu()  # (ffn_width, tokens)
    return _groups_from_order(_balanced_kmeans(points, n_experts, seed), n_experts)


def _balanced_kmeans(points: torch.Tensor, n_experts: int, seed: int, iterations: int = 20) -> torch.Tensor:
    """Neuron order grouping equal-sized clusters of `points` (rows, unit-normalised).
    Clusters are forced to equal size by a greedy capacity-limited assignment
    (closest pairs first) in every iteration."""
    points = torch.nn.functional.normalize(points, dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(points.shape[0], generator=generator)[:n_experts]]
    assignment = None
    for _ in range(iterations):
        new_assignment = _balanced_assign(torch.cdist(points, centroids), n_experts)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for e in range(n_experts):
            centroids[e] = points[assignment == e].mean(dim=0)
    return torch.argsort(assignment * points.shape[0] + torch.arange(points.shape[0]))


def shared_neurons(activations: torch.Tensor, down_weight: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` neurons with the largest mean contribution on calibration tokens,
    mean |activation| x |down column|: the always-on shared neurons. Sorted indices."""
    contribution = activations.detach().float().abs().mean(dim=0) * down_weight.detach().float().norm(dim=0)
    return contribution.topk(count).indices.sort().values.cpu()


def _balanced_assign(distances: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assign each point to a cluster, closest (point, cluster) pairs first, capacity I/N."""
    n_points = distances.shape[0]
    capacity = n_points // n_experts
    order = torch.argsort(distances.flatten()).tolist()
    assignment = [-1] * n_points  # python lists: this loop touches ~I*N elements
    fill = [0] * n_experts
    placed = 0
    for flat in order:
        point, expert = divmod(flat, n_experts)
        if assignment[point] >= 0 or fill[expert] >= capacity:
            continue
        assignment[point] = expert
        fill[expert] += 1
        placed += 1
        if placed == n_points:
            break
    return torch.tensor(assignment, dtype=torch.long)
