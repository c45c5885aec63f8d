"""Prior-Approximate Router (PAR) losses: teacher pseudo-labels, PA loss, balance loss.

The teacher is the dense FFN, which equals the sum of all N experts on the same
input (the partition changes no weight); with shared experts, which every token
runs anyway, the routed experts' part of it, the sum of the N routed experts. A pseudo-label rule turns the experts'
individual outputs into a multi-hot target over experts per token; the PA loss
pulls the router distribution towards it. Formulas follow the released FactorLLM
code (zhenwuweihe/FactorLLM), with the KL reduced to a scalar for any batch shape.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import Registry


@dataclass(frozen=True)
class LabelContext:
    """What a pseudo-label rule may know of the layer beyond its experts' outputs.

    chosen_weight: the multiplier of a chosen expert under the trial's combine rule
        when the router is indifferent (N/K for `scaled`, 1 for `unscaled`).
    unchosen_mean: (N, H) each expert's calibration mean output, added for every
        unchosen expert (`mean_comp`), else None.
    """

    chosen_weight: float
    unchosen_mean: torch.Tensor | None = None


# (expert_outputs (S, N, H), top_k, context) -> multi-hot labels (S, N) in {0, 1}
PseudoLabelFn = Callable[[torch.Tensor, int, LabelContext], torch.Tensor]
PSEUDO_LABELS: Registry[PseudoLabelFn] = Registry("pseudo-label rule")

PROB_FLOOR = 1e-7  # the released code clips probabilities here before taking logs
MAX_SUBSETS = 20_000  # min_recon scores every K-subset: C(16, 8) = 12,870 fits, C(32, 16) does not


@PSEUDO_LABELS.register("min_mse")
def min_mse(expert_outputs: torch.Tensor, top_k: int, context: LabelContext | None = None) -> torch.Tensor:
    """The released code's rule: per token, the K experts whose own output is closest
    (mean squared error over features) to teacher / (N/K), the share each of K
    experts would carry if the K of them had to reproduce the teacher."""
    n_experts = expert_outputs.shape[1]
    teacher = expert_outputs.sum(dim=1, keepdim=True)  # (S, 1, H)
    errors = (expert_outputs - teacher / (n_experts / top_k)).pow(2).mean(dim=-1)  # (S, N)
    chosen = errors.topk(top_k, dim=-1, largest=False).indices
    return torch.zeros_like(errors).scatter_(1, chosen, 1.0)


@PSEUDO_LABELS.register("min_recon")
def min_recon(expert_outputs: torch.Tensor, top_k: int, context: LabelContext) -> torch.Tensor:
    """Per token, the K-subset whose combined output (under the trial's combine rule)
    best reconstructs the teacher, the sum of all experts: the best any router could
    pick, layer by layer. Every subset is scored exactly, through the experts' Gram
    matrix: with u_e = w * E_e - m_e and c = sum(m) - teacher, the error of subset
    mask s is s'(U U')s + 2 s'(U c) + |c|^2."""
    n_experts = expert_outputs.shape[1]
    subsets = subset_masks(n_experts, top_k).to(expert_outputs)  # (C, N)
    teacher = expert_outputs.sum(dim=1)  # (S, H)
    mean = context.unchosen_mean
    u = expert_outputs * context.chosen_weight
    c = -teacher
    if mean is not None:
        mean = mean.to(expert_outputs)
        u = u - mean  # (S, N, H)
        c = c + mean.sum(dim=0)
    gram = torch.einsum("snh,smh->snm", u, u)  # (S, N, N)
    cross = torch.einsum("snh,sh->sn", u, c)  # (S, N)
    errors = torch.einsum("cn,snm,cm->sc", subsets, gram, subsets) + 2 * cross @ subsets.t()  # (S, C), minus |c|^2
    return subsets[errors.argmin(dim=1)]


@functools.lru_cache(maxsize=16)
def subset_masks(n_experts: int, top_k: int) -> torch.Tensor:
    """(C(N, K), N) 0/1 rows, one per K-subset of the N experts."""
    count = math.comb(n_experts, top_k)
    if count > MAX_SUBSETS:
        raise ValueError(
            f"pseudo_label='min_recon' scores every K-subset; C({n_experts}, {top_k}) = {count:,} "
            f"exceeds {MAX_SUBSETS:,}; use fewer experts or pseudo_label='min_mse'"
        )
    rows = torch.zeros(count, n_experts)
    for row, subset in enumerate(itertools.combinations(range(n_experts), top_k)):
        rows[row, list(subset)] = 1.0
    return rows


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
