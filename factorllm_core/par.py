"""Prior-Approximate Router (PAR) losses: teacher pseudo-labels, PA loss, balance loss.

The teacher is the dense FFN, which equals the sum of all N experts on the same
input (the partition changes no weight). A pseudo-label rule turns the experts'
individual outputs into a multi-hot target over experts per token; the PA loss
pulls the router distribution towards it. Formulas follow the released FactorLLM
code (zhenwuweihe/FactorLLM), with the KL reduced to a scalar for any batch shape.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import Registry

# (expert_outputs (S, N, H), top_k) -> multi-hot labels (S, N) in {0, 1}
PseudoLabelFn = Callable[[torch.Tensor, int], torch.Tensor]
PSEUDO_LABELS: Registry[PseudoLabelFn] = Registry("pseudo-label rule")

PROB_FLOOR = 1e-7  # the released code clips probabilities here before taking logs


@PSEUDO_LABELS.register("min_mse")
def min_mse(expert_outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The released code's rule: per token, the K experts whose own output is closest
    (mean squared error over features) to teacher / (N/K), the share each of K
    experts would carry if the K of them had to reproduce the teacher."""
    n_experts = expert_outputs.shape[1]
    teacher = expert_outputs.sum(dim=1, keepdim=True)  # (S, 1, H)
    errors = (expert_outputs - teacher / (n_experts / top_k)).pow(2).mean(dim=-1)  # (S, N)
    chosen = errors.topk(top_k, dim=-1, largest=False).indices
    return torch.zeros_like(errors).scatter_(1, chosen, 1.0)


def pa_loss(router_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(router distribution || softmax(multi-hot label)), mean over tokens and routers.

    router_probs: (S, R, N); labels: (S, N). Returns a scalar.
    """
    p = router_probs.clamp_min(PROB_FLOOR)
    log_q = torch.log_softmax(labels.to(p.dtype), dim=-1).unsqueeze(1)  # (S, 1, N)
    return (p * (p.log() - log_q)).sum(dim=-1).mean()


def balance_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The released code's balance term: mean of (top-K mask x router softmax)."""
    mask = torch.zeros_like(probs).scatter_(1, indices, 1.0)
    return (mask * probs).mean()
