"""A trained factorized model out of the harness: a stock Hugging Face MoE class, and GGUF.

    python -m harness.export runs/sweeps/default/records/<trial_id> --out exported/1r3e1k1s
    python -m harness.export <trial dir or record.json> --out DIR --arch mixtral|qwen2_moe|granitemoeshared
    python -m harness.export <trial> --out DIR --format gguf --quant q8_0   # needs FACTORLLM_SERVE=1 bash install.sh

The folder (config.json, safetensors, tokenizer) loads with stock transformers,
`AutoModelForCausalLM.from_pretrained(DIR)`: no custom code, no `auto_map`. Each target
class computes, per token, softmax router probabilities, the top-K experts and their
renormalised probabilities as weights (Mixtral; Qwen2-MoE with `norm_topk_prob`;
GraniteMoeShared as a softmax over the top-K logits, the same numbers). A FactorLLM layer
maps onto that exactly when it has one router without a bias and no per-expert mean
compensation, and its combine rule is
  - `weighted` (renormalised probabilities x N: N folds into the down projections), any K;
  - a constant (`scaled`: N/K, `unscaled`: 1) at K = 1, where the renormalised weight is 1;
  - anything at K = N, where every expert runs: the router is zeroed, each weight is 1/N.
Shared experts become GraniteMoeShared's shared MLP (weight 1) or Qwen2-MoE's shared
expert, whose zero gate gives sigmoid(0) = 0.5, so its down projection is doubled.
A Qwen2 source (q/k/v biases) goes to GraniteMoeShared with `attention_bias` (o's bias
zero), which llama.cpp runs: llama.cpp computes Qwen2-MoE's shared-expert gate as
silu(x) / x (src/models/qwen2moe.cpp), 0/0 = NaN at the zero gate an exact export needs,
so `--arch qwen2_moe` is for transformers and vLLM only and refused with `--format gguf`.
Before anything is written the export's logits are compared with the factorized model's
on held-out text (fp32): an exact mapping must agree within 1e-4, or within twice the
rounding by which the factorized model's own two implementations (reference and sorted
dispatch) differ where that is larger (`rounding_floor`), or nothing is written.
Everything else is refused in one line naming the option that would make it exportable;
`--approximate` exports a constant combine at 1 < K < N anyway (router logits scaled by
2^-10, so the renormalised weights are nearly 1/K) and reports its measured error.

Modules: target.py (what a target class is) and targets/ (one file per class: config, tensors,
refusals); mapping.py (factorized model -> stock model, and what refuses it); write.py (the
checks and the atomic, locked write); cli.py (the command). A trial folder is read by
harness/trial_folder.py.
"""

from harness.export.cli import main
from harness.export.mapping import (
    APPROXIMATE_ROUTER_SCALE,
    NotExportable,
    factor_problems,
    gguf_problem,
    layer_tensors,
    pick_arch,
    source_problems,
    to_stock,
)
from harness.export.target import TARGETS, Layer, Target
from harness.export.write import EXACT_TOLERANCE, compare, export, rounding_floor

__all__ = [
    "APPROXIMATE_ROUTER_SCALE",
    "EXACT_TOLERANCE",
    "TARGETS",
    "Layer",
    "NotExportable",
    "Target",
    "compare",
    "export",
    "factor_problems",
    "gguf_problem",
    "layer_tensors",
    "main",
    "pick_arch",
    "rounding_floor",
    "source_problems",
    "to_stock",
]
