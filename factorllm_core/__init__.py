"""FactorLLM: factor a pretrained decoder-only LLM's FFNs into routed experts.

Pure torch (plus transformers' modelling classes). Read in this order:
partition.py -> experts.py -> router.py -> par.py -> ffn.py -> calibration.py ->
factorize.py.
"""

from . import fused  # noqa: F401  registers the opt-in `fused` (Triton) dispatch
from .calibration import Calibration, calibrate
from .config import FactorConfig
from .experts import DISPATCH, Experts
from .factorize import (
    FFN_ADAPTERS,
    FactorReport,
    build_factorized_ffn,
    defactorize,
    factor_config_of,
    factorize,
    load_factorized,
    load_trained_ffns,
    match_ffn,
    save_factorized,
    save_trained_ffns,
)
from .ffn import AuxCollector, FactorizedFFN, FFNAux, collect_aux, factorized_layers, use_dispatch
from .par import PSEUDO_LABELS, LabelContext, balance_loss, pa_loss
from .partition import PARTITIONS
from .router import COMBINES, ROUTER_INITS, ROUTER_MODES, Combine, Router, RouterMode, Routing
from .stats import RoutingStats, expert_similarity, router_agreement

__all__ = [
    "AuxCollector",
    "COMBINES",
    "Calibration",
    "Combine",
    "LabelContext",
    "ROUTER_INITS",
    "calibrate",
    "DISPATCH",
    "Experts",
    "FFNAux",
    "FFN_ADAPTERS",
    "FactorConfig",
    "FactorReport",
    "FactorizedFFN",
    "PARTITIONS",
    "PSEUDO_LABELS",
    "ROUTER_MODES",
    "Router",
    "RouterMode",
    "Routing",
    "RoutingStats",
    "balance_loss",
    "build_factorized_ffn",
    "collect_aux",
    "defactorize",
    "expert_similarity",
    "factor_config_of",
    "factorize",
    "factorized_layers",
    "load_factorized",
    "match_ffn",
    "pa_loss",
    "router_agreement",
    "save_factorized",
    "save_trained_ffns",
    "load_trained_ffns",
    "use_dispatch",
]
