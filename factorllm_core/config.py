"""FactorConfig: how to factor every FFN of a model. Frozen, validated when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .options import Bound, declared, option, short
from .par import PSEUDO_LABELS, subset_masks
from .partition import PARTITIONS
from .router import COMBINES, ROUTER_INITS, ROUTER_MODES

MAX_EXPERTS = 4096  # per layer; beyond this an expert is a handful of neurons
MAX_ROUTERS = 64  # per layer; the paper's settings use 1-4


@dataclass(frozen=True)
class FactorConfig:
    """One FactorLLM setting, `{n_routers}R{n_experts}E{top_k}K` (+ `{n_shared}S`).

    n_experts: N, routed experts per FFN layer; N + n_shared must divide the FFN width.
    top_k: K, routed experts run per token, 1 <= K <= N.
    n_routers: R, routers per layer; their softmaxes are averaged.
    partition: how neurons are grouped into experts (see PARTITIONS).
    combine: how chosen experts are weighted: `scaled` (x N/K, the paper's),
        `weighted` (renormalised top-K probabilities x N), `unscaled` (x 1) or
        `mean_comp` (x 1, and unchosen experts add their calibration mean output).
    router_mode: `par`, `lm_only`, `random` or `frozen` (see ROUTER_MODES).
    pseudo_label: the PAR teacher's labelling rule (see PSEUDO_LABELS): `min_mse`
        (the released code's) or `min_recon` (the K-subset that best rebuilds the
        dense output under `combine`).
    n_shared: shared experts, always active: the neurons with the largest mean
        contribution on calibration tokens, as many as n_shared experts hold. Each
        of the N + n_shared experts is FFN width / (N + n_shared) neurons wide.
    router_init: `random` (the paper's) or `fit` (fitted to the pseudo-label rule's
        labels on calibration inputs before training; see ROUTER_INITS).
    seed: seeds the random partition, router init and random routing.
    router_bias: the router's gates have a bias (the released code's); false makes a
        trained model exportable exactly to stock MoE classes (harness/export.py).

    `partition: coact`, `n_shared > 0`, `combine: mean_comp` and `router_init: fit`
    need a calibration pass (`needs_calibration`).
    """

    n_experts: int = option(bound=Bound(1, MAX_EXPERTS, unit="experts per layer"))
    top_k: int = option()  # 1 <= top_k <= n_experts, checked below
    n_routers: int = option(1, bound=Bound(1, MAX_ROUTERS, unit="routers per layer"))
    partition: str = option(
        "contiguous",
        recipe=True,
        choices=PARTITIONS,
        calibrated=lambda v: v == "coact",
        calibrated_hint="partition coact",
    )
    combine: str = option(
        "scaled",
        recipe=True,
        tag="{}",
        choices=COMBINES,
        calibrated=lambda v: COMBINES.get(v).add_unchosen_mean,
        calibrated_hint="combine mean_comp",
    )
    router_mode: str = option("par", choices=ROUTER_MODES)
    router_init: str = option(
        "random",
        recipe=True,
        tag="init={}",
        added_later=True,
        choices=ROUTER_INITS,
        calibrated=lambda v: v != "random",
        calibrated_hint="router_init fit",
    )
    pseudo_label: str = option("min_mse", recipe=True, tag="{}", choices=PSEUDO_LABELS)
    seed: int = option(0, axis=False, factor="factor_seed", bound=Bound(0, 2**31 - 1, why="a seed"))
    n_shared: int = option(
        0,
        recipe=True,
        added_later=True,
        calibrated=lambda v: v > 0,
        calibrated_hint="n_shared",
        bound=Bound(0, MAX_EXPERTS - 1, unit="shared experts per layer"),
    )
    router_bias: bool = option(True, recipe=True, tag="bias={}", added_later=True)

    def __post_init__(self):
        for d in declared(type(self)):  # types, registry names and bounds, from the declarations
            value = getattr(self, d.name)
            problem = d.option.problem(d.name, value, d.type) or (d.bound.problem(d.name, value) if d.bound else None)
            if problem:
                raise ValueError(problem)
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={short(self.top_k)} must satisfy 1 <= top_k <= n_experts={self.n_experts}")
        if self.router_init != "random" and ROUTER_MODES.get(self.router_mode).random_choice:
            raise ValueError(
                f"router_init={self.router_init!r} fits a router that router_mode={self.router_mode!r} "
                "never uses (it routes at random); use router_init='random'"
            )
        if self.pseudo_label == "min_recon":
            subset_masks(self.n_experts, self.top_k)  # raises when there are too many subsets to score

    def calibrated_options(self) -> list[str]:
        """The options of this setting that need a calibration pass, as `field=value`."""
        return [
            f"{d.name}={getattr(self, d.name)}"
            for d in declared(type(self))
            if d.option.calibrated and d.option.calibrated(getattr(self, d.name))
        ]

    @property
    def needs_calibration(self) -> bool:
        """Whether building this setting needs the dense model's activations on calibration tokens."""
        return bool(self.calibrated_options())

    @property
    def active_fraction(self) -> float:
        """Share of the FFN's neurons that run for one token: (K + n_shared) / (N + n_shared)."""
        return (self.top_k + self.n_shared) / (self.n_experts + self.n_shared)

    @property
    def name(self) -> str:
        """The paper's notation, e.g. 1R4E2K; shared experts add `{n_shared}S` (1R3E1K1S)."""
        return f"{self.n_routers}R{self.n_experts}E{self.top_k}K" + (f"{self.n_shared}S" if self.n_shared else "")

    def check_ffn_width(self, ffn_width: int, where: str = "model") -> None:
        groups = self.n_experts + self.n_shared
        if ffn_width % groups:
            divisors = [d for d in range(1, min(ffn_width, 64) + 1) if ffn_width % d == 0]
            what = (
                f"n_experts={groups}"
                if not self.n_shared
                else f"n_experts + n_shared = {self.n_experts} + {self.n_shared} = {groups}"
            )
            raise ValueError(
                f"{what} does not divide the FFN width {ffn_width} of {where}; allowed (<= 64): {divisors}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FactorConfig:
        known = {f.name for f in fields(cls)}
        allowed = ", ".join(sorted(known))
        not_names = [k for k in data if not isinstance(k, str)]
        if not_names:  # YAML keys like 1 or ~ (null): not an option, and not comparable with names
            raise ValueError(f"{short(not_names[0], 30)}: not an option name (keys are text); allowed: {allowed}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0][:40]}: unknown key; allowed: {allowed}")
        return cls(**data)
