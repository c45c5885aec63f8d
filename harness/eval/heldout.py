"""Quality without benchmarks: held-out LM loss and KL(dense || model) on a fixed text.

At small training budgets the benchmarks sit near chance and move by noise; the
next-token loss on text the model never trained on, and how far its next-token
distribution has moved from the dense model's, show progress with far less noise.
Both are measured per sequence, so a report can resample sequences for a
confidence interval and pair them across trials (every trial reads the same text).

The text is `eval.heldout_text` (default lee-news), its first `heldout_tokens`
tokens in file order, documents joined with EOS, cut into `heldout_seq_len`
sequences. The grid refuses a held-out text that is also the training corpus.

With `eval.heldout_documents: N`, the sequences are instead the text's first N documents,
each whole, after the token the tokenizer starts a text with (its BOS where it adds one,
else EOS, the separator above), so that every token of the document is predicted. Every
model then reads the same text whatever its tokenizer, and the loss in bits per byte
(nats / ln 2 over the document's UTF-8 bytes) compares across tokenizers, paired by
document, where nats per token cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from harness.assets.corpora import resolve_corpus, tokenize_documents
from harness.config import EvalConfig


def heldout_sequences(tokenizer, config: EvalConfig, max_len: int | None = None) -> torch.Tensor | list[torch.Tensor]:
    """(n_sequences, seq_len) token ids: the text's first tokens, in document order; with
    eval.heldout_documents, a list of 1-D sequences, one per document (`document_sequences`)."""
    if config.heldout_documents:
        return document_sequences(tokenizer, config, max_len)
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


def heldout_documents(config: EvalConfig) -> list[str]:
    """The first eval.heldout_documents non-empty documents of the held-out text, in file order."""
    docs = []
    for doc in resolve_corpus(config.heldout_text).documents():
        if doc.strip():
            docs.append(doc)
            if len(docs) == config.heldout_documents:
                return docs
    raise ValueError(
        f"eval.heldout_text {config.heldout_text!r} holds {len(docs)} non-empty documents; "
        f"eval.heldout_documents asks for {config.heldout_documents}"
    )


def document_bytes(config: EvalConfig) -> list[int]:
    """UTF-8 bytes of each held-out document: the same for every model."""
    return [len(doc.encode("utf-8")) for doc in heldout_documents(config)]


def start_token(tokenizer) -> int:
    """The token a text starts from: BOS where the tokenizer adds one (Gemma), else EOS (the
    document separator of the token-cut mode: SmolLM2 and Qwen add no BOS)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        return bos
    if eos is None:
        raise ValueError("the tokenizer has neither a BOS token it adds nor an EOS token to start a document from")
    return eos


def document_sequences(tokenizer, config: EvalConfig, max_len: int | None = None) -> list[torch.Tensor]:
    """One 1-D sequence per held-out document: the start token, then the whole document."""
    start = start_token(tokenizer)
    out = []
    for i, doc in enumerate(heldout_documents(config)):
        ids = [start] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if max_len is not None and len(ids) > max_len:
            raise ValueError(
                f"eval.heldout_documents: document {i} of {config.heldout_text!r} is {len(ids)} tokens, more "
                f"than the model's {max_len}; documents are measured whole: use a text of shorter documents"
            )
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def first_tokens(sequences, tokens: int):
    """The leading whole sequences holding at most `tokens` tokens (at least one); for a
    token-cut set, max(1, tokens // seq_len) rows."""
    n, total = 0, 0
    for row in sequences:
        if n and total + len(row) > tokens:
            break
        n, total = n + 1, total + len(row)
    return sequences[:n]


def as_batch(sequences, n: int | None, length: int = 128) -> torch.Tensor:
    """(rows, length) token ids for a check on a batch: a token-cut held-out set as it is (its
    first n rows), a document one joined and cut into n rows of `length` (all that fit: None)."""
    if isinstance(sequences, torch.Tensor):
        return sequences[:n]
    joined = torch.cat(list(sequences))
    rows = len(joined) // length if n is None else min(n, len(joined) // length)
    return joined[: rows * length].view(rows, length)


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
    model,
    sequences: torch.Tensor | list[torch.Tensor],
    device: str,
    dense_logprobs: list[torch.Tensor] | None = None,
    text_bytes: list[int] | None = None,
) -> dict:
    """Mean next-token loss (nats) per sequence and, given the dense model's
    log-probabilities on the same sequences, mean KL(dense || model) per sequence.
    `text_bytes` (documents only: the UTF-8 bytes each sequence predicts) adds the
    predicted tokens per sequence and bits per byte: sum of nats / ln 2 / sum of bytes."""
    losses, kls = [], []
    for i, logprobs in enumerate(_logprobs_per_sequence(model, sequences, device)):  # streamed: one in memory
        targets = sequences[i][1:]
        losses.append(float(-logprobs.gather(1, targets[:, None]).mean()))
        if dense_logprobs is not None:
            dense = dense_logprobs[i]
            kls.append(float((dense.exp() * (dense - logprobs)).sum(-1).mean()))
    predicted = [len(row) - 1 for row in sequences]
    result = {"tokens": sum(len(row) for row in sequences), "sequences": len(losses)}
    if isinstance(sequences, torch.Tensor):
        result |= {"seq_len": int(sequences.shape[1]), "loss": sum(losses) / len(losses)}
    else:  # documents of different lengths: per token over all of them
        result |= {"loss": sum(loss * n for loss, n in zip(losses, predicted)) / sum(predicted)}
    result |= {"perplexity": math.exp(result["loss"]), "per_sequence_loss": losses}
    if dense_logprobs is not None:
        weights = [1] * len(kls) if isinstance(sequences, torch.Tensor) else predicted
        kl = sum(k * n for k, n in zip(kls, weights)) / sum(weights)
        result.update(kl_from_dense=kl, per_sequence_kl=kls)
    if text_bytes is not None:
        nats = [loss * n for loss, n in zip(losses, predicted)]
        result |= {
            "per_sequence_tokens": predicted,
            "per_sequence_bytes": list(text_bytes),
            "bits_per_byte": sum(nats) / math.log(2) / sum(text_bytes),
        }
        if dense_logprobs is not None:
            kl_nats = sum(kl * n for kl, n in zip(kls, predicted))
            result["kl_bits_per_byte"] = kl_nats / math.log(2) / sum(text_bytes)
    return result
