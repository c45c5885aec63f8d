"""Routing statistics, accumulated over many batches without host syncs.

Per layer: tokens per expert (load), mean routing entropy of the averaged router
distribution, and, with R > 1 routers, how often the routers' own top-K choices
agree (mean fraction of shared experts over router pairs): the conflict signal.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from .router import Routing


class RoutingStats:
    def __init__(self, n_experts: int, n_routers: int, top_k: int):
        self.n_experts, self.n_routers, self.top_k = n_experts, n_routers, top_k
        self.tokens = 0
        self.load: torch.Tensor | None = None  # (N,) tokens routed to each expert
        self.entropy_sum: torch.Tensor | None = None
        self.agreement_sum: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, routing: Routing) -> None:
        load = torch.bincount(routing.indices.flatten(), minlength=self.n_experts)
        probs = routing.probs.clamp_min(1e-12)
        entropy = -(probs * probs.log()).sum(dim=-1).sum()
        agreement = router_agreement(routing.router_probs, self.top_k).sum()
        self.load = load if self.load is None else self.load + load
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.agreement_sum = agreement if self.agreement_sum is None else self.agreement_sum + agreement
        self.tokens += routing.indices.shape[0]

    def summary(self) -> dict:
        """Plain numbers: load per expert, load max/mean, entropy (nats and / ln N), agreement."""
        if self.tokens == 0:
            raise ValueError("no routing decisions were recorded")
        load = self.load.cpu().tolist()
        mean_load = sum(load) / len(load)
        entropy = float(self.entropy_sum) / self.tokens
        return {
            "tokens": self.tokens,
            "expert_load": load,
            "load_max_over_mean": max(load) / mean_load,
            "routing_entropy": entropy,
            "routing_entropy_normalized": entropy / math.log(self.n_experts) if self.n_experts > 1 else 0.0,
            "router_agreement": float(self.agreement_sum) / self.tokens if self.n_routers > 1 else None,
        }


def router_agreement(router_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(S, R, N) -> (S,) mean over router pairs of |topK_i & topK_j| / K (1 when R == 1)."""
    n_tokens, n_routers, n_experts = router_probs.shape
    if n_routers == 1:
        return torch.ones(n_tokens, device=router_probs.device)
    chosen = router_probs.topk(top_k, dim=-1).indices
    multi_hot = torch.zeros_like(router_probs).scatter_(2, chosen, 1.0)  # (S, R, N)
    pairs = [(multi_hot[:, i] * multi_hot[:, j]).sum(-1) / top_k for i, j in combinations(range(n_routers), 2)]
    return torch.stack(pairs).mean(dim=0)


def expert_similarity(expert_outputs: torch.Tensor) -> torch.Tensor:
    """(S, N, H) every expert's output per token -> mean pairwise cosine similarity
    over expert pairs and tokens (a scalar). Near 1: experts collapsed into one module."""
    n_experts = expert_outputs.shape[1]
    if n_experts < 2:
        return torch.tensor(float("nan"))
    unit = torch.nn.functional.normalize(expert_outputs.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (S, N, N)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (n_experts * (n_experts - 1))).mean()
