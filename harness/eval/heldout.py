"""Quality without benchmarks: held-out LM loss and KL(dense || model) on a fixed text.

At small training budgets the benchmarks sit near chance and move by noise; the
next-token loss on text the model never trained on, and how far its next-token
distribution has moved from the dense model's, show progress with far less noise.
Both are measured per sequence, so a report can resample sequences for a
confidence interval and pair them across trials (every trial reads the same text).

The text is `eval.heldout_text` (default lee-news), its first `heldout_tokens`
tokens in file order, documents joined with EOS, cut into `heldout_seq_len`
sequences. The grid refuses a held-out text that is also the training corpus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from harness.assets.corpora import resolve_corpus, tokenize_documents
from harness.config import EvalConfig


def heldout_sequences(tokenizer, config: EvalConfig, max_len: int | None = None) -> torch.Tensor:
    """(n_sequences, seq_len) token ids: the text's first tokens, in document order."""
    seq_len = min(config.heldout_seq_len, max_len or config.heldout_seq_len)
    n_sequences = config.heldout_tokens // seq_len
    wanted = n_sequences * seq_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in tokenize_documents(resolve_corpus(config.heldout_text).documents(), tokenizer, max_tokens=wanted):
        ids.extend(doc + eos)
    if len(ids) < wanted:
        raise ValueError(
            f"eval.heldout_text {config.heldout_text!r} holds {len(ids)} tokens; eval.heldout_tokens asks for {wanted}"
        )
    return torch.tensor(ids[:wanted], dtype=torch.long).view(n_sequences, seq_len)


@torch.no_grad()
def _logprobs_per_sequence(model, sequences: torch.Tensor, device: str) -> Iterator[torch.Tensor]:
    """Per sequence, log-softmax of the model's next-token logits at positions
    0..L-2, (L-1, vocab) float32 on the CPU, one sequence at a time."""
    model.eval()
    for row in sequences:
        logits = model(input_ids=row[None].to(device), use_cache=False).logits[0, :-1]
        yield torch.log_softmax(logits.float(), dim=-1).cpu()


def next_token_logprobs(model, sequences: torch.Tensor, device: str) -> list[torch.Tensor]:
    """All sequences' log-probabilities, kept: for the dense model only (a trial compares
    its factorized model with them; 2,048 tokens x 49,152 = 0.4 GB)."""
    return list(_logprobs_per_sequence(model, sequences, device))


@torch.no_grad()
def heldout_measures(
    model, sequences: torch.Tensor, device: str, dense_logprobs: list[torch.Tensor] | None = None
) -> dict:
    """Mean next-token loss (nats) per sequence and, given the dense model's
    log-probabilities on the same sequences, mean KL(dense || model) per sequence."""
    losses, kls = [], []
    for i, logprobs in enumerate(_logprobs_per_sequence(model, sequences, device)):  # streamed: one in memory
        targets = sequences[i, 1:]
        losses.append(float(-logprobs.gather(1, targets[:, None]).mean()))
        if dense_logprobs is not None:
            dense = dense_logprobs[i]
            kls.append(float((dense.exp() * (dense - logprobs)).sum(-1).mean()))
    result = {
        "tokens": int(sequences.numel()),
        "sequences": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "loss": sum(losses) / len(losses),
        "perplexity": math.exp(sum(losses) / len(losses)),
        "per_sequence_loss": losses,
    }
    if dense_logprobs is not None:
        result.update(kl_from_dense=sum(kls) / len(kls), per_sequence_kl=kls)
    return result
