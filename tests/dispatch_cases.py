"""Small expert stacks and routings shared by the dispatch tests."""

import torch

from factorllm_core import FactorConfig, build_factorized_ffn
from factorllm_core.factorize import GatedFFNWeights


def make_experts(seed=0, hidden=48, width=96, n_experts=4, top_k=2):
    g = torch.Generator().manual_seed(seed)
    weights = GatedFFNWeights(
        torch.randn(width, hidden, generator=g) / 7,
        torch.randn(width, hidden, generator=g) / 7,
        torch.randn(hidden, width, generator=g) / 10,
        torch.nn.SiLU(),
    )
    return build_factorized_ffn(weights, FactorConfig(n_experts, top_k), layer_seed=0).experts


def routing(n_tokens, n_experts, top_k, seed=1, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, n_experts, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1  # an expert that receives no token at all
    indices = scores.topk(top_k, dim=1).indices
    weights = torch.rand(n_tokens, top_k, generator=g) + 0.5
    return indices, weights
