"""An lm-eval LM that runs each shared context once: lm-eval's HFLM, with its
loglikelihood scored by harness/packed_scoring.py.

A multiple-choice question asks for log P(continuation | context) once per answer
choice, all with the same context. HFLM runs context + continuation for every
choice, right-pads the batch, and computes the LM head (vocabulary-wide logits and
their log-softmax) at every position. `SharedPrefixLM` runs only the tokens the
answers need (see packed_scoring.py for the packing). The result is HFLM's
log-likelihood up to float rounding (tests/harness/test_shared_prefix.py pins
1e-4 in fp32 on every benchmark's request shapes).

What it does not handle goes to HFLM's own code, counted in `paths["hflm"]`:
loglikelihood_rolling, generate_until, seq2seq models, attention implementations
that ignore a 4D mask (flash-attention, flex), `batch_size="auto"`, requests
longer than the model's window (HFLM truncates them from the left) and groups
longer than a sliding attention window. Routing in a factorized model is per
token, so dense and factorized models take the same path.
"""

from __future__ import annotations

from collections import Counter

from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from harness.eval.packed_scoring import ROW_TOKENS, Group, Scorer, group_by_context, pack

Request = tuple  # ((context, continuation) | None, context tokens, continuation tokens)


class SharedPrefixLM(HFLM):
    """HFLM whose loglikelihood runs each distinct context once (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: Counter = Counter()  # requests served: shared (packed) | hflm
        self.row_tokens = ROW_TOKENS
        self.scorer = Scorer(
            self.model, self.device, getattr(self, "softmax_dtype", None), getattr(self, "mixed_precision_dtype", None)
        )  # both new in lm-eval 0.4.9
        self.hflm_reason = self._why_hflm()
        window = getattr(self.model.config, "sliding_window", None)
        uses_window = getattr(self.model.config, "use_sliding_window", True) is not False
        self.sliding_window = window if isinstance(window, int) and window > 0 and uses_window else None

    @property
    def work(self) -> dict:
        return self.scorer.work

    def _why_hflm(self) -> str | None:
        """Why every request must take HFLM's path, or None."""
        if self.backend != "causal":
            return f"{self.backend} model"
        if not isinstance(self.batch_size, int):
            return f"batch_size {self.batch_size!r} (give an int)"
        return self.scorer.unsupported()

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        # loglikelihood_rolling's windows carry no cache key (None): HFLM's path.
        if self.hflm_reason or any(req[0] is None for req in requests):
            self.paths["hflm"] += len(requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups, elsewhere = self._group(requests)
        answers: list = [None] * len(requests)
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (shared contexts)",
        )
        rows = pack(groups, self.row_tokens)
        for start in range(0, len(rows), self.batch_size):
            scored = self.scorer.score_rows(rows[start : start + self.batch_size])
            for i, answer in scored.items():
                answers[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            self.paths["shared"] += len(scored)
            bar.update(len(scored))
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
        fits, elsewhere = [], []
        for i, (_, context, continuation) in enumerate(requests):
            if len(context) + len(continuation) > self.max_length + 1:  # HFLM truncates from the left
                elsewhere.append(i)
            else:
                fits.append((i, (context, continuation)))
        kept = []
        for group in group_by_context(fits):
            if self.sliding_window is not None and group.length > self.sliding_window:
                elsewhere.extend(group.requests)
            else:
                kept.append(group)
        return kept, elsewhere
