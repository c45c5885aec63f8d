"""Benchmark scoring speed: lm-eval's HFLM against SharedPrefixLM, on the same items, in one run.

    python benchmarks/eval_throughput.py                                   # SmolLM2-135M, 6 benchmarks x 100 items
    python benchmarks/eval_throughput.py --tasks arc_easy,hellaswag --limit 300 --batch-size 8

For each benchmark both LMs score the same seeded sample of items (HFLM first,
then SharedPrefixLM; `--order shared-first` swaps them). Time is what each LM's
loglikelihood spent, so task building, which lm-eval does the same for both, is
left out; the end-to-end time is printed beside it. It also prints the largest
per-choice log-likelihood difference and how many items chose differently (with
the largest margin among them: a different choice is expected only on a
near-tie; under acc_norm the margin is per character, as the choice). speedup = HFLM seconds / SharedPrefixLM seconds. The issue's targets
on a 2-core CPU: >= 2.5x on ARC-Easy and HellaSwag, >= 1.2x on PIQA, >= 1.0x
everywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.benchmarks import TASK_SET, evaluate, make_lm, resolve_task_names  # noqa: E402
from harness.models import load_model, use_offline_mode_if_hub_unreachable  # noqa: E402


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


def run(kind: str, loaded, name: str, args) -> tuple[dict, float, float]:
    lm = timed_loglikelihood(make_lm(kind, loaded.model, loaded.tokenizer, args.batch_size, args.device))
    start = time.perf_counter()
    result = evaluate(lm, [name], limit=args.limit, sample_seed=args.sample_seed)[name]
    return result, lm.seconds, time.perf_counter() - start


def compare(a, b) -> tuple[float, int, float]:
    """(largest |log-likelihood difference|, items choosing differently, their largest margin:
    the gap between the two chosen answers' log-likelihoods, under either LM)."""
    assert a.items["id"] == b.items["id"], "the two LMs scored different items"
    largest, differ, margin = 0.0, 0, 0.0
    for lls_a, lls_b, sa, sb, pa, pb in zip(a.items["lls"], b.items["lls"], a.items["scores"], b.items["scores"],
                                            a.items["pred"], b.items["pred"]):
        largest = max(largest, *(abs(x - y) for x, y in zip(lls_a, lls_b)))
        if pa != pb:
            differ += 1
            margin = max(margin, abs(sa[pa] - sa[pb]), abs(sb[pa] - sb[pb]))
    return largest, differ, margin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa,openbookqa,winogrande,boolq",
                        help=f"comma list of {', '.join(TASK_SET)}, or 'all'")
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
    print(f"{args.model}, {args.device}, fp32, batch size {args.batch_size}, {torch.get_num_threads()} threads, "
          f"items per benchmark: {args.limit or 'all'} (seed {args.sample_seed}), order {args.order}")
    print("| benchmark | items | HFLM s | shared s | speedup | end-to-end speedup | max abs Δll | "
          "choices differ (max margin) | accuracy HFLM / shared |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in names:
        runs = {kind: run(kind, loaded, name, args) for kind in kinds}
        (a, a_s, a_total), (b, b_s, b_total) = runs["hflm"], runs["shared"]
        largest, differ, margin = compare(a, b)
        differs = f"{differ} ({margin:.2e})" if differ else "0"
        print(f"| {name} | {a.n} | {a_s:.1f} | {b_s:.1f} | {a_s / b_s:.2f}x | {a_total / b_total:.2f}x | "
              f"{largest:.1e} | {differs} | {a.value:.4f} / {b.value:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
