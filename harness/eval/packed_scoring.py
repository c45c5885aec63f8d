"""Score (context, continuation) token pairs with each distinct context run once.

Pure torch + transformers (no lm-eval), so the GPU check can run it on machines
without lm-eval; harness/shared_prefix.py adapts it to lm-eval. Requests with
identical context tokens form a group; groups are packed side by side into rows:

    row:   context A | A choice 1[:-1] | A choice 2[:-1] | context B | B choice 1[:-1] ...
    sees:  a context token sees its own context (causal); a choice token sees its
           context and its own earlier tokens; positions restart per context and
           every choice continues its context's positions
    head:  only at the last context token (it predicts every choice's first token)
           and at each choice token but the last

A group is packed whole into a row of up to ROW_TOKENS tokens (best fit, longest
first; a longer group gets a row of its own), `batch_size` rows per forward pass:
one pass, no KV cache and no padding inside rows. The answer per pair is
(sum of the continuation's log-probabilities, whether greedy decoding gives it),
as lm-eval's HFLM computes it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Tokens per packed row. Attention over a row costs ~ROW_TOKENS / (12 x hidden size)
# of its linear layers (about 4% at 256 tokens and hidden 576; 512 was slower on HellaSwag).
ROW_TOKENS = 256
MASKED_ATTENTION = ("sdpa", "eager")  # implementations that apply a 4D mask as given


@dataclass
class Group:
    """Requests sharing one context, laid out in a row from `start`."""

    context: list[int]
    requests: list[int]  # indices into the request list
    continuations: list[list[int]]
    start: int = 0

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class Row:
    groups: list[Group] = field(default_factory=list)
    length: int = 0

    def add(self, group: Group) -> None:
        group.start = self.length
        self.groups.append(group)
        self.length += group.length


@dataclass
class Scorer:
    """Scores packed rows with `model`; `work` counts tokens through the body (row padding
    included) and positions through the LM head."""

    model: torch.nn.Module
    device: torch.device
    softmax_dtype: torch.dtype | None = None
    autocast_dtype: torch.dtype | None = None  # lm-eval's mixed_precision_dtype
    work: dict = field(default_factory=lambda: {"body_tokens": 0, "head_positions": 0})

    def unsupported(self) -> str | None:
        """Why this model cannot be scored by packing, or None."""
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation not in MASKED_ATTENTION:
            return f"attention implementation {implementation!r} (packing needs one of {MASKED_ATTENTION})"
        return None

    def score_pairs(
        self,
        pairs: list[tuple[list[int], list[int]]],
        batch_size: int,
        row_tokens: int = ROW_TOKENS,
        progress: Callable[[dict], None] | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per (context, continuation) pair, in order; `progress`
        gets each batch's answers ({pair index: answer}) as they come."""
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError(
                    f"pair {i}: empty context or continuation (lm-eval puts the BOS/EOT token in an empty context)"
                )
        answers: list = [None] * len(pairs)
        rows = pack(group_by_context(enumerate(pairs)), row_tokens)
        for start in range(0, len(rows), batch_size):
            scored = self.score_rows(rows[start : start + batch_size])
            for i, answer in scored.items():
                answers[i] = answer
            if progress:
                progress(scored)
        return answers

    def score_rows(self, rows: list[Row]) -> dict[int, tuple[float, bool]]:
        """One forward pass over packed rows: {request index: (log-likelihood, greedy)}."""
        if (reason := self.unsupported()) is not None:  # the mask would be ignored: wrong answers
            raise RuntimeError(f"cannot score packed rows with {reason}")
        length = max(row.length for row in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        positions = torch.zeros(len(rows), length, dtype=torch.long)
        # span[r, t]: first row position token t may see (its context's start); -1 for padding.
        # choice[r, t]: which of its group's choices token t belongs to (-1: the context).
        span = torch.full((len(rows), length), -1, dtype=torch.long)
        choice = torch.full((len(rows), length), -1, dtype=torch.long)
        needed: list[tuple[int, int]] = []  # (row, position) whose logits are read
        reads = []  # per request: (index, its positions' numbers in `needed`, targets)
        for r, row in enumerate(rows):
            for group in row.groups:
                lay_out(group, r, ids, positions, span, choice, needed, reads)
        mask = packed_mask(span, choice, self.model, self.autocast_dtype).to(self.device)
        flat = torch.tensor([r * length + t for r, t in needed], device=self.device)
        logits = self._logits_at(ids.to(self.device), positions.to(self.device), mask, flat)  # (needed, vocab)
        self.work["body_tokens"] += ids.numel()
        self.work["head_positions"] += len(needed)
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        greedy = logprobs.argmax(-1)
        scored = {}
        for i, at, targets in reads:
            at, targets = torch.tensor(at, device=self.device), torch.tensor(targets, device=self.device)
            chosen = logprobs[at].gather(1, targets[:, None]).squeeze(1)
            scored[i] = (float(chosen.sum()), bool((greedy[at] == targets).all()))
        return scored

    def _logits_at(self, ids, positions, mask, flat: torch.Tensor) -> torch.Tensor:
        """Logits at the flattened (row x length) positions `flat`; the LM head runs only
        there when the model calls its output embedding module (a pre-hook selects them)."""
        head = self.model.get_output_embeddings()
        selected = []

        def select(module, args):
            hidden = args[0]  # (rows, length, hidden)
            selected.append(True)
            return (hidden.reshape(-1, hidden.shape[-1])[flat][None],) + tuple(args[1:])

        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with torch.no_grad(), autocast, _pre_hook(head, select):
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
        if selected:
            return logits[0]  # (needed, vocab)
        return logits.reshape(-1, logits.shape[-1])[flat]  # no head module seen: all positions ran


def packed_mask(span: torch.Tensor, choice: torch.Tensor, model, autocast_dtype=None) -> torch.Tensor:
    """(rows, 1, length, length): query t sees key s when s <= t, s is in t's group
    (s >= span[t]), and s is t's context or t's own choice; padding sees itself only
    (a row with nothing to see gives NaN). Boolean for sdpa, additive for eager."""
    length = span.shape[1]
    index = torch.arange(length)
    causal = index[None, :] <= index[:, None]  # (query, key)
    same_group = index[None, None, :] >= span[:, :, None]
    key_choice = choice[:, None, :]
    own = (key_choice == -1) | (key_choice == choice[:, :, None])
    allowed = causal & same_group & own & (span >= 0)[:, :, None]
    allowed |= torch.eye(length, dtype=torch.bool)
    allowed = allowed[:, None]
    if model.config._attn_implementation == "sdpa":
        return allowed
    dtype = autocast_dtype or model.dtype
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def group_by_context(pairs) -> list[Group]:
    """(index, (context, continuation)) items -> groups of identical context tokens, in first-seen order."""
    groups: dict[tuple, Group] = {}
    for i, (context, continuation) in pairs:
        found = groups.setdefault(tuple(context), Group(list(context), [], []))
        found.requests.append(i)
        found.continuations.append(list(continuation))
    return list(groups.values())


def lay_out(group: Group, r: int, ids, positions, span, choice, needed, reads) -> None:
    """Write one group into row r from group.start and note where its answers are read."""
    start, n_context = group.start, len(group.context)
    ids[r, start : start + n_context] = torch.tensor(group.context)
    positions[r, start : start + n_context] = torch.arange(n_context)
    span[r, start : start + group.length] = start
    last = len(needed)
    needed.append((r, start + n_context - 1))  # predicts each choice's first token
    offset = start + n_context
    for number, (i, continuation) in enumerate(zip(group.requests, group.continuations)):
        inputs = continuation[:-1]
        ids[r, offset : offset + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        positions[r, offset : offset + len(inputs)] = torch.arange(n_context, n_context + len(inputs))
        choice[r, offset : offset + len(inputs)] = number
        at = [last] + list(range(len(needed), len(needed) + len(inputs)))
        needed.extend((r, offset + j) for j in range(len(inputs)))
        reads.append((i, at, continuation))
        offset += len(inputs)


def pack(groups: list[Group], row_tokens: int) -> list[Row]:
    """Best fit, longest first, into rows of up to row_tokens (a longer group fills a row
    alone); rows come out longest first, so a batch pads little."""
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for group in sorted(groups, key=lambda g: -g.length):
        slot = bisect.bisect_left(free, (group.length, -1))
        if slot < len(free):
            _, number = free.pop(slot)
        else:
            number = len(rows)
            rows.append(Row())
        rows[number].add(group)
        left = row_tokens - rows[number].length
        if left > 0:
            bisect.insort(free, (left, number))
    return sorted(rows, key=lambda row: -row.length)


@contextmanager
def _pre_hook(module, hook):
    handle = module.register_forward_pre_hook(hook) if module is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
