"""FactorConfig: how to factor every FFN of a model. Frozen, validated when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .par import PSEUDO_LABELS
from .partition import PARTITIONS
from .router import COMBINES, ROUTER_MODES


MAX_EXPERTS = 4096  # per layer; beyond this an expert is a handful of neurons
MAX_ROUTERS = 64  # per layer; the paper's settings use 1-4


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class FactorConfig:
    """One FactorLLM setting, `{n_routers}R{n_experts}E{top_k}K`.

    n_experts: N, experts per FFN layer; must divide the FFN width.
    top_k: K, experts run per token, 1 <= K <= N.
    n_routers: R, routers per layer; their softmaxes are averaged.
    partition: how neurons are grouped into experts (see PARTITIONS).
    combine: how chosen experts are weighted: `scaled` (x N/K, the paper's) or
        `weighted` (renormalised top-K probabilities x N).
    router_mode: `par`, `lm_only`, `random` or `frozen` (see ROUTER_MODES).
    pseudo_label: the PAR teacher's labelling rule (see PSEUDO_LABELS).
    seed: seeds the random partition, router init and random routing.
    """

    n_experts: int
    top_k: int
    n_routers: int = 1
    partition: str = "contiguous"
    combine: str = "scaled"
    router_mode: str = "par"
    pseudo_label: str = "min_mse"
    seed: int = 0

    def __post_init__(self):
        for name in ("n_experts", "top_k", "n_routers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={_short(value)} must be an integer")
        for name in ("partition", "combine", "router_mode", "pseudo_label"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={_short(getattr(self, name))} must be a name (a string)")
        if not 1 <= self.n_experts <= MAX_EXPERTS:
            raise ValueError(f"n_experts={self.n_experts} must be in [1, {MAX_EXPERTS}]")
        if not 0 <= self.seed < 2 ** 31:
            raise ValueError(f"seed={self.seed} must be in [0, 2**31)")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} must satisfy 1 <= top_k <= n_experts={self.n_experts}"
            )
        if not 1 <= self.n_routers <= MAX_ROUTERS:
            raise ValueError(f"n_routers={self.n_routers} must be in [1, {MAX_ROUTERS}]")
        PARTITIONS.get(self.partition, "partition")
        COMBINES.get(self.combine, "combine")
        ROUTER_MODES.get(self.router_mode, "router_mode")
        PSEUDO_LABELS.get(self.pseudo_label, "pseudo_label")

    @property
    def name(self) -> str:
        """The paper's notation, e.g. 1R4E2K."""
        return f"{self.n_routers}R{self.n_experts}E{self.top_k}K"

    def check_ffn_width(self, ffn_width: int, where: str = "model") -> None:
        if ffn_width % self.n_experts:
            divisors = [d for d in range(1, min(ffn_width, 64) + 1) if ffn_width % d == 0]
            raise ValueError(
                f"n_experts={self.n_experts} does not divide the FFN width {ffn_width} of "
                f"{where}; allowed n_experts (<= 64): {divisors}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FactorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FactorConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)
