"""Routers: score experts per token, pick the top-K, and weight the picked experts.

The router and the experts meet at a narrow interface (as in megablocks): the
router returns a `Routing` (probabilities, indices, weights) and the experts take
indices and weights. Router modes and combine rules are registries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class RouterMode:
    """How a router behaves in training and inference.

    trainable: the router's weights receive gradients.
    random_choice: experts are picked uniformly at random per token (seeded),
        ignoring the router's scores.
    uses_pa_loss: the PAR teacher-student loss is computed and applied.
    straight_through: in training, a combine rule whose weights carry no gradient
        (`scaled`: a constant N/K) is given one: the weights keep their value and
        take the gradient of the chosen experts' router probabilities
        (w * (1 + p - stop_grad(p))), so the LM loss reaches the router.
    """

    trainable: bool
    random_choice: bool
    uses_pa_loss: bool
    straight_through: bool = False


ROUTER_MODES: Registry[RouterMode] = Registry("router mode")
ROUTER_MODES.register("par")(RouterMode(trainable=True, random_choice=False, uses_pa_loss=True))
# lm_only: the router learns from the LM loss alone, so it needs the straight-through
# weights under `scaled` (otherwise only the small balance term would move it).
ROUTER_MODES.register("lm_only")(
    RouterMode(trainable=True, random_choice=False, uses_pa_loss=False, straight_through=True)
)
ROUTER_MODES.register("random")(RouterMode(trainable=False, random_choice=True, uses_pa_loss=False))
ROUTER_MODES.register("frozen")(RouterMode(trainable=False, random_choice=False, uses_pa_loss=False))


@dataclass
class Routing:
    """One routing decision for S tokens, N experts, R routers, top-K.

    router_probs: (S, R, N) softmax of each router's logits.
    probs: (S, N) the routers' probabilities averaged over R.
    indices: (S, K) chosen experts per token (distinct).
    weights: (S, K) multiplier applied to each chosen expert's output.
    """

    router_probs: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


CombineFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Combine:
    """How chosen experts make the layer's output.

    weights: (probs (S, N), indices (S, K), n_experts) -> (S, K), each chosen
        expert's multiplier.
    add_unchosen_mean: every unchosen expert adds its calibration mean output (a
        fixed vector per expert, `FactorizedFFN.unchosen_mean`), so a token routed
        away from an expert still gets that expert's average contribution. At
        K = N nothing is unchosen and the layer is the dense FFN.
    """

    weights: CombineFn
    add_unchosen_mean: bool = False

    def uniform_weight(self, n_experts: int, top_k: int) -> float:
        """The multiplier of a chosen expert when the router is indifferent (uniform
        probabilities): what the pseudo-label rules assume."""
        probs = torch.full((1, n_experts), 1.0 / n_experts)
        return float(self.weights(probs, torch.arange(top_k)[None], n_experts)[0, 0])


COMBINES: Registry[Combine] = Registry("combine")


def scaled(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The paper's rule: each chosen expert x N/K (hard mask; no gradient to the router)."""
    top_k = indices.shape[1]
    return torch.full(indices.shape, n_experts / top_k, dtype=probs.dtype, device=probs.device)


def weighted(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Renormalised top-K router probabilities x N (differentiable w.r.t. the router)."""
    chosen = probs.gather(1, indices)  # (S, K)
    return chosen / chosen.sum(dim=1, keepdim=True) * n_experts


def unscaled(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each chosen expert x 1: the chosen neurons keep exactly their dense output."""
    return torch.ones(indices.shape, dtype=probs.dtype, device=probs.device)


COMBINES.register("scaled")(Combine(scaled))
COMBINES.register("weighted")(Combine(weighted))
COMBINES.register("unscaled")(Combine(unscaled))
# unscaled, plus each unchosen expert's calibration mean output (needs calibration)
COMBINES.register("mean_comp")(Combine(unscaled, add_unchosen_mean=True))


class Router(nn.Module):
    """R linear gates on the FFN input (with a bias, as the released code, unless `bias=False`);
    their softmaxes are averaged."""

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        n_routers: int,
        top_k: int,
        mode: str,
        combine: str,
        seed: int,
        bias: bool = True,
    ):
        super().__init__()
        self.n_experts, self.n_routers, self.top_k = n_experts, n_routers, top_k
        self.mode = ROUTER_MODES.get(mode, "router_mode")
        self.combine = COMBINES.get(combine, "combine")
        self.gate = nn.Linear(hidden_size, n_routers * n_experts, bias=bias)
        self.gate.requires_grad_(self.mode.trainable)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (S, hidden) -> Routing over S tokens."""
        # The logits are computed transposed, (R, N, S): with only R*N rows, the softmax
        # and the top-K then run along contiguous memory (on CPU at 4,096 x 576 the whole
        # router takes ~0.6 ms instead of ~1.1). Routing gets (S, ...) views of them.
        if self.gate.bias is None:
            logits = torch.mm(self.gate.weight, x.t())
        else:
            logits = torch.addmm(self.gate.bias.unsqueeze(1), self.gate.weight, x.t())
        probs_t = logits.float().view(self.n_routers, self.n_experts, -1).softmax(dim=1)  # (R, N, S)
        mean_t = probs_t[0] if self.n_routers == 1 else probs_t.mean(dim=0)  # (N, S)
        router_probs, probs = probs_t.permute(2, 0, 1), mean_t.t()  # (S, R, N), (S, N)
        if self.mode.random_choice:
            scores = torch.rand(probs.shape, generator=self._generator(x.device), device=x.device)
            probs_for_weights = torch.full_like(probs, 1.0 / self.n_experts)
            indices = scores.topk(self.top_k, dim=-1).indices  # (S, K)
        else:
            probs_for_weights = probs
            # max (first of equal maxima) along dim 0 is ~2x faster than argmax there
            indices = (
                mean_t.max(dim=0).indices.unsqueeze(1)
                if self.top_k == 1
                else mean_t.topk(self.top_k, dim=0).indices.t()
            )  # (S, K)
        weights = self.combine.weights(probs_for_weights, indices, self.n_experts)
        if self.mode.straight_through and self.training and torch.is_grad_enabled() and not weights.requires_grad:
            chosen = probs.gather(1, indices)  # (S, K), differentiable
            weights = weights * (1 + chosen - chosen.detach()).to(weights.dtype)  # same value, p's gradient
        return Routing(router_probs, probs, indices, weights)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The random-routing generators' states, per device, for checkpoints."""
        return {str(device): g.get_state() for device, g in self._generators.items()}

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        for device, state in states.items():
            self._generator(torch.device(device)).set_state(state)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


# How a router's weights start. (router, inputs (T, H) | None, labels (T, N) | None, seed)
# -> facts about the fit for the record, or None. `inputs` are the dense FFN's inputs on
# calibration tokens, `labels` the pseudo-label rule's multi-hot targets on them.
RouterInitFn = Callable[["Router", torch.Tensor | None, torch.Tensor | None, int], dict | None]
ROUTER_INITS: Registry[RouterInitFn] = Registry("router init")


@ROUTER_INITS.register("random")
def random_init(router: Router, inputs, labels, seed: int) -> None:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)), but seeded per layer."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(router.gate.in_features)
    with torch.no_grad():
        for p in (router.gate.weight, router.gate.bias):  # the weight's draw is the same without a bias
            if p is not None:
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator).to(p))


FIT_STEPS = 300  # full-batch Adam steps; converged on SmolLM2 layers (agreement flat after ~200)
FIT_LR = 1e-2
FIT_HOLDOUT = 0.2  # the last share of calibration tokens, kept out of the fit to measure it


@ROUTER_INITS.register("fit")
def fitted_init(router: Router, inputs: torch.Tensor | None, labels: torch.Tensor | None, seed: int) -> dict:
    """Start from `random`, then fit every router's softmax to the labels spread evenly
    over their K experts (cross-entropy, full-batch Adam on cached inputs: no
    backpropagation through the model). Returns how often the fitted router's top-K
    matches the labels on calibration tokens it was not fitted on."""
    if inputs is None or labels is None:
        raise ValueError("router_init='fit' needs calibration inputs and labels (train.calibration_tokens > 0)")
    random_init(router, None, None, seed)
    n_fit = inputs.shape[0] - max(1, int(inputs.shape[0] * FIT_HOLDOUT))
    x, target = inputs.float(), labels.float() / labels.sum(dim=1, keepdim=True)
    weight = router.gate.weight.detach().float().clone().requires_grad_(True)
    bias = None if router.gate.bias is None else router.gate.bias.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in (weight, bias) if p is not None], lr=FIT_LR)
    shape = (-1, router.n_routers, router.n_experts)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            log_p = torch.nn.functional.linear(x[:n_fit], weight, bias).view(shape).log_softmax(-1)
            loss = -(log_p * target[:n_fit, None, :]).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        router.gate.weight.copy_(weight)
        if bias is not None:
            router.gate.bias.copy_(bias)
        probs = torch.nn.functional.linear(x, weight, bias).view(shape).softmax(-1).mean(1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(router.top_k, dim=1).indices, 1.0)
        overlap = (chosen * (labels > 0)).sum(1) / router.top_k  # share of the K picks the labels also pick
    return {
        "fit_loss": float(loss.detach()),
        "fit_overlap": float(overlap[:n_fit].mean()),
        "heldout_overlap": float(overlap[n_fit:].mean()),
        "heldout_tokens": int(inputs.shape[0] - n_fit),
        "chance_overlap": router.top_k / router.n_experts,
    }
