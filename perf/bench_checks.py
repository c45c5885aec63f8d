"""Correctness gates shared by the benchmark scripts: nothing is timed or reported
unless it matches its reference (relative error 1e-5 in fp32, 1e-2 in bf16/fp16)."""

import torch


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    expected, got = expected.float(), got.float()
    return ((expected - got).norm() / expected.norm()).item()


def check_close(what: str, expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    """Print the error, or stop the script with it."""
    rel, limit = relative_error(expected, got), tolerance(dtype)
    if not rel <= limit:  # also catches NaN
        raise SystemExit(f"correctness check failed: {what} relative error {rel:.2e} > {limit}")
    print(f"correctness: {what} relative error {rel:.1e} (limit {limit:.0e})")


# SmolLM2-135M's architecture, for the scripts that time random weights of its shape
# fmt: off
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
# fmt: on
