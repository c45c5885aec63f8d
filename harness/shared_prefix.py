"""An lm-eval LM that runs each shared context once.

A multiple-choice question asks for log P(continuation | context) once per answer
choice, all with the same context. lm-eval's HFLM runs context + continuation for
every choice, right-pads the batch, and computes the LM head (vocabulary-wide
logits and their log-softmax) at every position. `SharedPrefixLM` runs only the
tokens the answers need, packed side by side:

    row:   context A | A choice 1[:-1] | A choice 2[:-1] | context B | B choice 1[:-1] ...
    sees:  a context token sees its own context (causal); a choice token sees its
           context and its own earlier tokens; positions restart per context and
           every choice continues its context's positions
    head:  only at the last context token (it predicts every choice's first token)
           and at each choice token but the last

Requests are grouped by identical context tokens; a group is packed whole into a
row of up to ROW_TOKENS tokens (best fit, longest first; a longer group gets a
row of its own), `batch_size` rows per forward pass. One pass, no KV cache and no
padding inside rows. The result is HFLM's log-likelihood up to float rounding
(tests/harness/test_shared_prefix.py pins 1e-4 in fp32 on every benchmark's
request shapes).

What it does not handle goes to HFLM's own code, counted in `paths["hflm"]`:
loglikelihood_rolling, generate_until, seq2seq models, attention implementations
that ignore a 4D mask (flash-attention, flex), `batch_size="auto"`, requests
longer than the model's window (HFLM truncates them from the left) and groups
longer than a sliding attention window. Routing in a factorized model is per
token, so dense and factorized models take the same path.
"""

from __future__ import annotations

import bisect
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

# Tokens per packed row. Attention over a row costs ~ROW_TOKENS / (12 x hidden size)
# of its linear layers (about 4% at 256 tokens and hidden 576; 512 was slower on HellaSwag).
ROW_TOKENS = 256
MASKED_ATTENTION = ("sdpa", "eager")  # implementations that apply a 4D mask as given

Request = tuple  # ((context, continuation) | None, context tokens, continuation tokens)


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


class SharedPrefixLM(HFLM):
    """HFLM whose loglikelihood runs each distinct context once (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: Counter = Counter()  # requests served: shared (this class) | hflm
        self.row_tokens = ROW_TOKENS
        self.work = Counter()  # tokens through the body (row padding included), positions through the head
        self.hflm_reason = self._why_hflm()
        window = getattr(self.model.config, "sliding_window", None)
        uses_window = getattr(self.model.config, "use_sliding_window", True) is not False
        self.sliding_window = window if isinstance(window, int) and window > 0 and uses_window else None

    def _why_hflm(self) -> str | None:
        """Why every request must take HFLM's path, or None."""
        if self.backend != "causal":
            return f"{self.backend} model"
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation not in MASKED_ATTENTION:
            return f"attention implementation {implementation!r} (packing needs one of {MASKED_ATTENTION})"
        if not isinstance(self.batch_size, int):
            return f"batch_size {self.batch_size!r} (give an int)"
        return None

    # -- routing requests ------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        # loglikelihood_rolling's windows carry no cache key (None): HFLM's path.
        if self.hflm_reason or any(req[0] is None for req in requests):
            self.paths["hflm"] += len(requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups, elsewhere = self._group(requests)
        answers: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared contexts)")
        rows = _pack(groups, self.row_tokens)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            for i, answer in self._score(batch).items():
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            done = sum(len(g.requests) for row in batch for g in row.groups)
            self.paths["shared"] += done
            bar.update(done)
        if elsewhere:
            self.paths["hflm"] += len(elsewhere)
            found = super()._loglikelihood_tokens([requests[i] for i in elsewhere], True, override_bs)
            for i, answer in zip(elsewhere, found, strict=True):
                answers[i] = answer
            bar.update(len(elsewhere))
        bar.close()
        return answers

    def _group(self, requests: list[Request]) -> tuple[list[Group], list[int]]:
        """Groups of requests with identical context tokens, and the requests HFLM must take."""
        groups: dict[tuple, Group] = {}
        elsewhere = []
        for i, (_, context, continuation) in enumerate(requests):
            if len(context) + len(continuation) > self.max_length + 1:  # HFLM truncates from the left
                elsewhere.append(i)
                continue
            group = groups.setdefault(tuple(context), Group(list(context), [], []))
            group.requests.append(i)
            group.continuations.append(list(continuation))
        kept = []
        for group in groups.values():
            if self.sliding_window is not None and group.length > self.sliding_window:
                elsewhere.extend(group.requests)
            else:
                kept.append(group)
        return kept, elsewhere

    # -- one forward pass over packed rows ---------------------------------------------------------

    def _score(self, rows: list[Row]) -> dict[int, tuple[float, bool]]:
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
                _lay_out(group, r, ids, positions, span, choice, needed, reads)
        mask = self._mask(span, choice)
        flat = torch.tensor([r * length + t for r, t in needed], device=self.device)
        logits = self._logits_at(ids.to(self.device), positions.to(self.device), mask, flat)  # (needed, vocab)
        self.work.update(body_tokens=ids.numel(), head_positions=len(needed))
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        greedy = logprobs.argmax(-1)
        scored = {}
        for i, at, targets in reads:
            at, targets = torch.tensor(at, device=self.device), torch.tensor(targets, device=self.device)
            chosen = logprobs[at].gather(1, targets[:, None]).squeeze(1)
            scored[i] = (float(chosen.sum()), bool((greedy[at] == targets).all()))
        return scored

    def _mask(self, span: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """(rows, 1, length, length): query t sees key s when s <= t, s is in t's group
        (s >= span[t]), and s is t's context or t's own choice; padding sees itself only
        (a row with nothing to see gives NaN)."""
        length = span.shape[1]
        index = torch.arange(length)
        causal = index[None, :] <= index[:, None]  # (query, key)
        same_group = index[None, None, :] >= span[:, :, None]
        key_choice = choice[:, None, :]
        own = (key_choice == -1) | (key_choice == choice[:, :, None])
        allowed = causal & same_group & own & (span >= 0)[:, :, None]
        allowed |= torch.eye(length, dtype=torch.bool)
        allowed = allowed[:, None].to(self.device)
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = self.mixed_precision_dtype or self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)

    def _logits_at(self, ids, positions, mask, flat: torch.Tensor) -> torch.Tensor:
        """Logits at the flattened (row x length) positions `flat`; the LM head runs only
        there when the model calls its output embedding module (a pre-hook selects them)."""
        head = self.model.get_output_embeddings()
        selected = []

        def select(module, args):
            hidden = args[0]  # (rows, length, hidden)
            selected.append(True)
            return (hidden.reshape(-1, hidden.shape[-1])[flat][None],) + tuple(args[1:])

        autocast = (torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype)
                    if self.mixed_precision_dtype is not None else nullcontext())
        with torch.no_grad(), autocast, _pre_hook(head, select):
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                use_cache=False).logits
        if selected:
            return logits[0]  # (needed, vocab)
        return logits.reshape(-1, logits.shape[-1])[flat]  # no head module seen: all positions ran


def _lay_out(group: Group, r: int, ids, positions, span, choice, needed, reads) -> None:
    """Write one group into row r from group.start and note where its answers are read."""
    start, n_context = group.start, len(group.context)
    ids[r, start:start + n_context] = torch.tensor(group.context)
    positions[r, start:start + n_context] = torch.arange(n_context)
    span[r, start:start + group.length] = start
    last = len(needed)
    needed.append((r, start + n_context - 1))  # predicts each choice's first token
    offset = start + n_context
    for number, (i, continuation) in enumerate(zip(group.requests, group.continuations)):
        inputs = continuation[:-1]
        ids[r, offset:offset + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        positions[r, offset:offset + len(inputs)] = torch.arange(n_context, n_context + len(inputs))
        choice[r, offset:offset + len(inputs)] = number
        at = [last] + list(range(len(needed), len(needed) + len(inputs)))
        needed.extend((r, offset + j) for j in range(len(inputs)))
        reads.append((i, at, continuation))
        offset += len(inputs)


def _pack(groups: list[Group], row_tokens: int) -> list[Row]:
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
