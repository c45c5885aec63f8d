"""Benchmark scoring speed: lm-eval's HFLM against SharedPrefixLM, on the same items, in one run.

    python perf/eval_throughput.py                                   # SmolLM2-135M, 6 benchmarks x 100 items
    python perf/eval_throughput.py --tasks arc_easy,hellaswag --limit 300 --batch-size 8

For each benchmark both LMs score the same seeded sample of items (HFLM first,
then SharedPrefixLM; `--order shared-first` swaps them). Time is what each LM's
loglikelihood spent, so task building, which lm-eval does the same for both, is
left out; the end-to-end time is printed beside it. It also prints the largest
per-choice log-likelihood difference and how many items chose differently (with
the largest margin among them: a different choice is expected only on a
near-tie; under acc_norm the margin is per character, as the choice).
speedup = HFLM seconds / SharedPrefixLM seconds. arithmetic ratio = HFLM's linear-
layer FLOPs / SharedPrefixLM's (body tokens x body parameters + LM-head positions
x head parameters, x2; HFLM's right padding left out): the speedup a scorer that
runs at the same FLOP rate can reach, since neither can skip the arithmetic it
counts. The issue's targets on a 2-core CPU: >= 2.5x on ARC-Easy and HellaSwag,
>= 1.2x on PIQA, >= 1.0x everywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.assets.models import load_model, use_offline_mode_if_hub_unreachable  # noqa: E402
from harness.eval.benchmarks import TASK_SET, evaluate, make_lm, resolve_task_names  # noqa: E402


def timed_loglikelihood(lm):
    """Wrap lm.loglikelihood so lm.seconds accumulates the time spent in it."""
    lm.seconds, inner = 0.0, lm.loglikelihood

    def wrapper(requests, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            lm.seconds += time.perf_counter() - start

    lm.loglikelihood = wrapper
    return lm


def hflm_work(lm):
    """Count what HFLM runs: each request's context + continuation[:-1], except that
    one-token continuations of one context share a forward (its logits cache); every
    position goes through the LM head. Right padding is left out (a lower bound)."""
    lm.work, inner = {"body_tokens": 0, "head_positions": 0}, lm._loglikelihood_tokens

    def wrapper(requests, *args, **kwargs):
        runs = {tuple(context + continuation[:-1]) for _, context, continuation in requests}
        tokens = sum(min(len(r), lm.max_length) for r in runs)
        lm.work["body_tokens"] += tokens
        lm.work["head_positions"] += tokens
        return inner(requests, *args, **kwargs)

    lm._loglikelihood_tokens = wrapper
    return lm


def arithmetic(work: dict, model) -> float:
    """FLOPs of the linear layers (2 per multiply-add): body per token, head per position."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    return 2 * (body * work["body_tokens"] + head * work["head_positions"])


def run(kind: str, loaded, name: str, args) -> tuple[dict, float, float, float]:
    lm = timed_loglikelihood(make_lm(kind, loaded.model, loaded.tokenizer, args.batch_size, args.device))
    if kind == "hflm":
        hflm_work(lm)
    start = time.perf_counter()
    result = evaluate(lm, [name], limit=args.limit, sample_seed=args.sample_seed)[name]
    return result, lm.seconds, time.perf_counter() - start, arithmetic(lm.work, loaded.model)


def compare(a, b) -> tuple[float, int, float]:
    """(largest |log-likelihood difference|, items choosing differently, their largest margin:
    the gap between the two chosen answers' log-likelihoods, under either LM)."""
    assert a.items["id"] == b.items["id"], "the two LMs scored different items"
    largest, differ, margin = 0.0, 0, 0.0
    for lls_a, lls_b, sa, sb, pa, pb in zip(
        a.items["lls"], b.items["lls"], a.items["scores"], b.items["scores"], a.items["pred"], b.items["pred"]
    ):
        largest = max(largest, *(abs(x - y) for x, y in zip(lls_a, lls_b)))
        if pa != pb:
            differ += 1
            margin = max(margin, abs(sa[pa] - sa[pb]), abs(sb[pa] - sb[pb]))
    return largest, differ, margin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--tasks",
        default="arc_easy,hellaswag,piqa,openbookqa,winogrande,boolq",
        help=f"comma list of {', '.join(TASK_SET)}, or 'all'",
    )
    parser.add_argument("--limit", type=int, default=100, help="items per benchmark (0: full sets)")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="the same for both LMs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--order", choices=["hflm-first", "shared-first"], default="hflm-first")
    args = parser.parse_args(argv)
    args.limit = args.limit or None
    names = resolve_task_names(args.tasks)
    use_offline_mode_if_hub_unreachable()
    loaded = load_model(args.model, dtype=torch.float32, device=args.device)
    kinds = ["hflm", "shared"] if args.order == "hflm-first" else ["shared", "hflm"]
    print(
        f"{args.model}, {args.device}, fp32, batch size {args.batch_size}, {torch.get_num_threads()} threads, "
        f"items per benchmark: {args.limit or 'all'} (seed {args.sample_seed}), order {args.order}"
    )
    print(
        "| benchmark | items | HFLM s | shared s | speedup | end-to-end speedup | arithmetic ratio | "
        "max abs Δll | choices differ (max margin) | accuracy HFLM / shared |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name in names:
        runs = {kind: run(kind, loaded, name, args) for kind in kinds}
        (a, a_s, a_total, a_flops), (b, b_s, b_total, b_flops) = runs["hflm"], runs["shared"]
        largest, differ, margin = compare(a, b)
        differs = f"{differ} ({margin:.2e})" if differ else "0"
        print(
            f"| {name} | {a.n} | {a_s:.1f} | {b_s:.1f} | {a_s / b_s:.2f}x | {a_total / b_total:.2f}x | "
            f"{a_flops / b_flops:.2f}x | {largest:.1e} | {differs} | {a.value:.4f} / {b.value:.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
