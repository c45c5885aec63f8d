"""Whole-model prefill: dense vs factorized (1R4E1K, 1R4E2K), timed in one run.

    python perf/model_prefill.py --preset tinyllama-gpu   # H100/H200: 8 x 2,048 tokens, bf16
    python perf/model_prefill.py                          # CPU: SmolLM2-135M config, 1 x 512 tokens, fp32

Random weights from the model's config (speed does not depend on the values).
A prefill is one forward pass over the batch that keeps only the last
position's logits (`logits_to_keep=1`), as generation does. The factorized
models run under each `--dispatch` path (default `auto`: `grouped` on a Hopper
GPU in bf16, `sorted` on CPU). Before timing: K = N must reproduce the dense
logits, and every timed dispatch must match the reference dispatch's logits on
the 1R4E2K model. Times are medians of interleaved runs;
speedup = dense time / variant time. The issue's GPU targets: 1R4E1K >= 1.30x,
1R4E2K >= 1.15x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_checks import SMOLLM2_135M, check_close  # beside this script
from transformers import LlamaConfig, LlamaForCausalLM

from factorllm_core import FactorConfig, factorize, factorized_layers

# fmt: off
PRESETS = {
    # TinyLlama-1.1B's architecture
    "tinyllama-gpu": dict(config=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048),
                          batch=8, seq=2048, device="cuda", dtype="bfloat16", repeats=10),
    "smollm2-cpu": dict(config=SMOLLM2_135M, batch=1, seq=512, device="cpu", dtype="float32", repeats=7),
    # for the test suite: seconds on a CPU
    "tiny-cpu": dict(config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 max_position_embeddings=256),
                     batch=2, seq=64, device="cpu", dtype="float32", repeats=3),
}
# fmt: on
VARIANTS = {"1R4E1K": FactorConfig(4, 1), "1R4E2K": FactorConfig(4, 2)}


def build(config, device, dtype):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    llama = LlamaConfig(**config, attn_implementation="sdpa")
    with torch.device(device):  # initialise on the device: a 1.1B model inits in seconds there
        dense = LlamaForCausalLM(llama).to(dtype).eval()
    models = {"dense": dense}
    for name, factor_config in VARIANTS.items():
        models[name] = factorize_copy(dense, factor_config)
    return models


def factorize_copy(dense, factor_config):
    model = copy.deepcopy(dense)
    factorize(model, factor_config)
    return model.eval()


def set_dispatch(model, name: str) -> None:
    for _, layer in factorized_layers(model):
        layer.experts.dispatch = name


@torch.no_grad()
def last_logits(model, ids):
    return model(ids, use_cache=False, logits_to_keep=1).logits.float()


def check(models, ids, dispatches):
    dense = models["dense"]
    dtype = next(dense.parameters()).dtype
    small = ids[:1, : min(ids.shape[1], 256)]
    full = factorize_copy(dense, FactorConfig(4, 4))
    check_close("K=N vs dense logits", last_logits(dense, small), last_logits(full, small), dtype)
    del full
    model = models["1R4E2K"]
    set_dispatch(model, "reference")
    expected = last_logits(model, small)
    for dispatch in dispatches:
        set_dispatch(model, dispatch)
        check_close(f"{dispatch} vs reference dispatch logits, 1R4E2K", expected, last_logits(model, small), dtype)


@torch.no_grad()
def run(models, ids, repeats, dispatches, warmup=2):
    """Times of the dense model and of every factorized model under each dispatch."""
    entries = {"dense": (models["dense"], None)}
    for name in VARIANTS:
        for dispatch in dispatches:
            entries[f"{name} {dispatch}"] = (models[name], dispatch)
    cuda = ids.is_cuda
    times = {name: [] for name in entries}
    for step in range(warmup + repeats):
        for name, (model, dispatch) in entries.items():  # interleaved: noise hits all alike
            if dispatch:
                set_dispatch(model, dispatch)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(medians, tokens) -> str:
    dense = medians["dense"]
    lines = ["| model | ms | x dense time | speedup | tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / dense:.2f} | {dense / t:.2f} | {tokens / t:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--dispatch", default="auto", help="comma-separated dispatch paths for the factorized models (default: auto)"
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} needs a CUDA device; none is available")
    print(
        f"preset {args.preset}: batch {preset['batch']} x {preset['seq']} tokens, {preset['dtype']}, "
        f"{preset['device']}, torch {torch.__version__}"
    )
    models = build(preset["config"], preset["device"], preset["dtype"])
    ids = torch.randint(0, preset["config"]["vocab_size"], (preset["batch"], preset["seq"]), device=preset["device"])
    check(models, ids, args.dispatch.split(","))
    medians = run(models, ids, args.repeats or preset["repeats"], args.dispatch.split(","))
    print(table(medians, ids.numel()))


if __name__ == "__main__":
    main()
