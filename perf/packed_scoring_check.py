"""The benchmark scorer's engine (harness/packed_scoring.py) on this device, without lm-eval.

    python perf/packed_scoring_check.py                  # auto device: SmolLM2-135M config, fp32 and bf16
    python perf/packed_scoring_check.py --size tiny      # seconds on CPU (CI)

Random weights from the model's config, a factorized copy (1R4E2K) beside the dense
model, and multiple-choice-shaped requests (a 40-120 token context shared by four
answers of 2-30 tokens; a third of the questions with one-token answers, as MMLU).
Each model is scored twice: packed (each context once, LM head only where read) and
the way HFLM does it (context + answer for every answer, right-padded, LM head at
every position). Prints the largest log-likelihood difference (per answer, and per
answer token), how many greedy flags differ, and the time ratio measured in this
run. Exit 1 if a difference exceeds the dtype's tolerance: fp32 1e-4 per answer;
bf16 0.02 nats per answer token (bf16 rounds every layer's output to 8 bits of
mantissa, and packing changes the shapes and so the order of the sums).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_checks, beside this script

import torch  # noqa: E402
from bench_checks import SMOLLM2_135M  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from factorllm_core import FactorConfig, factorize  # noqa: E402
from harness.eval.packed_scoring import Scorer  # noqa: E402

# fmt: off
SIZES = {
    "smollm2": SMOLLM2_135M,
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
}
# fmt: on
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.02}  # per answer; per answer token for bf16


def requests(vocab: int, questions: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()

    pairs = []
    for q in range(questions):
        context = tokens(40, 120)
        pairs += [(context, tokens(1, 1) if q % 3 == 0 else tokens(2, 30)) for _ in range(4)]
    return pairs


def score_like_hflm(model, pairs, batch_size: int, device) -> list[tuple[float, bool]]:
    """Every pair as its own right-padded row, logits and log-softmax at every position."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        rows = [c + k[:-1] for c, k in batch]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids.to(device)).logits, -1)
        for r, (context, continuation) in enumerate(batch):
            span = logprobs[r, len(context) - 1 : len(context) - 1 + len(continuation)]
            target = torch.tensor(continuation, device=device)
            out.append((float(span.gather(1, target[:, None]).sum()), bool((span.argmax(-1) == target).all())))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(name: str, model, pairs, dtype, device, batch_size: int) -> bool:
    model = model.to(device=device, dtype=dtype).eval()
    scorer = Scorer(model, device)
    scorer.score_pairs(pairs[:8], batch_size)  # warm-up
    score_like_hflm(model, pairs[:8], 4 * batch_size, device)
    sync(device)
    start = time.perf_counter()
    packed = scorer.score_pairs(pairs, batch_size)
    sync(device)
    packed_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = score_like_hflm(model, pairs, 4 * batch_size, device)  # about the same tokens per pass
    sync(device)
    reference_s = time.perf_counter() - start
    largest = max(abs(a[0] - b[0]) for a, b in zip(packed, reference))
    per_token = max(abs(a[0] - b[0]) / len(k) for a, b, (_, k) in zip(packed, reference, pairs))
    greedy = sum(a[1] != b[1] for a, b in zip(packed, reference))
    ok = (per_token if dtype == torch.bfloat16 else largest) <= TOLERANCE[dtype]
    print(
        f"| {name} | {str(dtype).removeprefix('torch.')} | {len(pairs)} | {largest:.1e} | {per_token:.1e} | "
        f"{greedy} | "
        f"{reference_s:.2f} | {packed_s:.2f} | {reference_s / packed_s:.2f}x | {'ok' if ok else 'FAILED'} |",
        flush=True,
    )
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--questions", type=int, default=None, help="default: 200 on CUDA, 16 on CPU")
    parser.add_argument("--batch-size", type=int, default=16, help="packed rows of 256 tokens per pass")
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    questions = args.questions or (200 if device.type == "cuda" else 16)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SIZES[args.size]))
    factorized = copy.deepcopy(dense)
    factorize(factorized, FactorConfig(n_experts=4, top_k=2))
    pairs = requests(dense.config.vocab_size, questions)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"{args.size}, {device}, {questions} questions x 4 answers; time ratio = HFLM-style / packed")
    print(
        "| model | dtype | requests | max abs Δll | per token | greedy flags differ | HFLM-style s | packed s | "
        "ratio | check |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    ok = [
        check(name, model, pairs, dtype, device, args.batch_size)
        for dtype in dtypes
        for name, model in (("dense", dense), ("1R4E2K", factorized))
    ]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
