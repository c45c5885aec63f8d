"""PAR training of routers and expert slices, resumable from checkpoints.

Frozen: embeddings, attention, norms, lm_head. Trainable: the expert slices (shared
ones included), and the routers when the router mode trains them. Loss per micro-batch:
    lambda_lm x next-token cross-entropy + lambda_pa x PA loss + lambda_balance x balance loss
    + lambda_kd x KL(dense || model) of the next-token distributions
(the PA term only for modes that use it, the KL term only when lambda_kd > 0). The
PAR teacher runs inside each FactorizedFFN on the hidden state the student really
sees; the distillation teacher is the whole dense model, rebuilt exactly from the
experts before training starts (`defactorize`).
"""

from __future__ import annotations

import copy
import errno
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from factorllm_core import collect_aux, defactorize, factorized_layers
from harness.assets.cache import DISK_FULL_BYTES
from harness.config import TrainConfig
from harness.measure.analysis import ChurnMonitor
from reports.record import write_atomic

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"  # the resumable training state, in a trial's checkpoint folder


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainSummary:
    tokens: int = 0
    steps: int = 0
    micro_batches: int = 0
    seconds: float = 0.0
    tokens_per_s: float | None = None
    final: dict = field(default_factory=dict)  # mean loss terms over the last optimizer step
    history: list = field(default_factory=list)  # [step, lm, pa, balance, kd] per optimizer step
    resumed_from_step: int = 0
    trainable_params: int = 0
    churn: dict | None = None  # {"every": steps, "series": [[step, churn], ...]} (see ChurnMonitor)
    series: list = field(default_factory=list)  # the intermediate results (see `train`'s on_report)
    heldout_seconds: float = 0.0  # spent on the held-out slice (part of `seconds`)

    def to_dict(self) -> dict:
        return asdict(self)


def mark_trainable(model: torch.nn.Module) -> int:
    """Freeze everything, then unfreeze expert slices and trainable routers."""
    model.requires_grad_(False)
    for _, layer in factorized_layers(model):
        layer.experts.requires_grad_(True)
        if layer.shared is not None:
            layer.shared.requires_grad_(True)
        if layer.down_bias is not None:
            layer.down_bias.requires_grad_(True)
        layer.router.requires_grad_(layer.router.mode.trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_batches(sequences: list[torch.Tensor], batch_size: int, pad_id: int) -> list[dict]:
    """Consecutive sequences -> padded batches; padding is masked and ignored by the loss."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        length = max(len(s) for s in group)
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": int(mask.sum())})
    return batches


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    model,
    batches: list[dict],
    config: TrainConfig,
    device: str,
    checkpoint_dir: Path | None,
    on_step: Callable[[int], None] | None = None,
    churn: ChurnMonitor | None = None,
    bf16: bool | None = None,
    teacher: torch.nn.Module | None = None,
    heldout: Callable[[], float] | None = None,
    on_report: Callable[[dict, Path | None], None] | None = None,
) -> TrainSummary:
    """Train in place. Resumes from `checkpoint_dir/train_state.pt` when present.
    Progress: a log line about every 10% of the budget. `churn`, if given, measures routing churn after
    its steps (its state is checkpointed with the rest). `bf16`: autocast to bf16
    (default: on CUDA only). `teacher` (lambda_kd > 0): the dense model to distil from,
    by default `dense_teacher(model)` as it is now; pass one built earlier when the
    experts have changed since factorization (the layer-wise stage).
    Intermediate results: every `config.report_every` steps and at the last, a point
    {step, tokens, lm, pa, balance, kd, lr, tokens_per_s, churn where measured at that step,
    heldout_loss every `config.heldout_every` steps and at the last, from `heldout()`} is
    appended to the summary's series and passed to `on_report(point, checkpoint folder if
    one was written at that step)`."""
    bf16 = device.startswith("cuda") if bf16 is None else bf16
    # built before a resume loads trained weights into `model`
    teacher = (teacher or dense_teacher(model)) if config.lambda_kd else None
    summary = TrainSummary(trainable_params=mark_trainable(model))
    total_steps = math.ceil(len(batches) / config.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.warmup_ratio, config.min_lr_ratio)
    )
    state_path = checkpoint_dir / TRAIN_STATE if checkpoint_dir else None
    if state_path and state_path.exists():
        _load_state(model, optimizer, scheduler, summary, state_path, churn)
    if churn is not None:
        churn.start()
    model.train()
    budget = sum(b["tokens"] for b in batches)
    # summary.seconds counts every process's training time (a resume carries it on); the rate is this
    # process's own tokens over its own seconds, so that a resume does not dilute it
    resumed_at, resumed_tokens = time.perf_counter(), summary.tokens
    start = resumed_at - summary.seconds
    for step in range(summary.steps, total_steps):
        micro = batches[step * config.grad_accum : (step + 1) * config.grad_accum]
        terms = _optimizer_step(model, micro, config, device, optimizer, params, step, bf16, teacher)
        scheduler.step()
        summary.steps, summary.micro_batches = step + 1, summary.micro_batches + len(micro)
        summary.tokens += sum(b["tokens"] for b in micro)
        summary.final = terms
        summary.history.append([step + 1, terms["lm"], terms["pa"], terms["balance"], terms["kd"]])
        summary.seconds = time.perf_counter() - start
        rate = (summary.tokens - resumed_tokens) / max(1e-9, time.perf_counter() - resumed_at)
        if _crossed_decile(summary.tokens, micro, budget):
            log.info(
                "train %d/%d tokens, step %d/%d, lm %.3f, pa %s, balance %.4f, kd %s, %.0f tok/s",
                summary.tokens,
                budget,
                step + 1,
                total_steps,
                terms["lm"],
                _fmt(terms["pa"]),
                terms["balance"],
                _fmt(terms["kd"]),
                rate,
            )
        last = step + 1 == total_steps
        if churn is not None:
            churn.after_step(step + 1, last=last)
        save = bool(state_path and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and not last)
        heldout_due = heldout is not None and config.heldout_every > 0 and _every(step + 1, config.heldout_every, last)
        point = None
        if heldout_due or save or _every(step + 1, config.report_every, last):
            point = _point(summary, terms, scheduler, rate, churn)
            if heldout_due:
                clock = time.perf_counter()
                point["heldout_loss"] = _heldout_loss(model, heldout)
                summary.heldout_seconds += time.perf_counter() - clock
            summary.series.append(point)
        if save:  # after the point, so that a resume keeps it in the series
            _save_state(model, optimizer, scheduler, summary, state_path, churn)
        if on_report and point is not None:
            on_report(point, state_path.parent if save else None)
        if on_step:
            on_step(step + 1)
    model.eval()
    if churn is not None:
        summary.churn = {"every": churn.every, "series": churn.series}
    summary.seconds = time.perf_counter() - start
    summary.tokens_per_s = summary.tokens / summary.seconds if summary.seconds > 0 else None
    return summary


# The keys of an intermediate result (`_point`, then `heldout_loss` where measured).
SERIES_KEYS = ("step", "tokens", "lm", "pa", "balance", "kd", "lr", "tokens_per_s", "churn", "heldout_loss")
SCHEDULER_METRICS = ("heldout_loss", "lm")  # the series keys an early-stopping scheduler may compare (lower is better)
SCHEDULER_TIME = "tokens"  # and what it counts progress in (each trial's last report repeats all three)


def _every(step: int, every: int, last: bool) -> bool:
    """Whether something done every `every` steps (0 = at the last step only) is due."""
    return last or bool(every and step % every == 0)


def _point(summary: TrainSummary, terms: dict, scheduler, rate: float, churn) -> dict:
    """This step's intermediate result, without the held-out loss (the caller adds it)."""
    step = summary.steps
    point = {
        "step": step,
        "tokens": summary.tokens,
        **{k: terms[k] for k in ("lm", "pa", "balance", "kd") if terms.get(k) is not None},
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": rate,
    }
    if churn is not None and churn.series and churn.series[-1][0] == step:
        point["churn"] = churn.series[-1][1]
    return point


def _heldout_loss(model, heldout: Callable[[], float]) -> float:
    """`heldout()` in eval mode, in the weights' own dtype (fp32: a 512-token forward pass,
    no autocast), leaving the model in training mode and the routers' random streams where
    they were (random routing draws in every forward pass: an evaluation must not change what
    training draws next)."""
    layers = factorized_layers(model)
    rng = [layer.router.rng_state() for _, layer in layers]
    try:
        with torch.no_grad():
            return float(heldout())
    finally:
        for (_, layer), state in zip(layers, rng):
            layer.router.set_rng_state(state)
        model.train()


def dense_teacher(model) -> torch.nn.Module:
    """The dense model a factorized one equals with every expert on: a frozen copy with
    the experts merged back (`defactorize`), the distillation teacher."""
    return defactorize(copy.deepcopy(model)).requires_grad_(False).eval()


def _optimizer_step(
    model, micro: list[dict], config: TrainConfig, device: str, optimizer, params, step, bf16, teacher=None
):
    sums = {"lm": 0.0, "pa": None, "balance": 0.0, "kd": None}
    for batch in micro:
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        with autocast(device, bf16), collect_aux(model) as aux:
            out = model(**inputs, labels=batch["labels"].to(device), use_cache=False)
            pa, balance = aux.pa_loss(), aux.balance_loss()
            loss = config.lambda_lm * out.loss + config.lambda_balance * balance
            if pa is not None:
                loss = loss + config.lambda_pa * pa
            kd = None
            if teacher is not None:
                with torch.no_grad():
                    dense_logits = teacher(**inputs, use_cache=False).logits
                kd = distillation_kl(dense_logits, out.logits, inputs["attention_mask"])
                loss = loss + config.lambda_kd * kd
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"non-finite loss at optimizer step {step + 1}: lm={out.loss.item()}, "
                f"pa={None if pa is None else pa.item()}, balance={balance.item()}, "
                f"kd={None if kd is None else kd.item()}"
            )
        (loss / len(micro)).backward()
        sums["lm"] += out.loss.item() / len(micro)
        sums["balance"] += balance.item() / len(micro)
        if pa is not None:
            sums["pa"] = (sums["pa"] or 0.0) + pa.item() / len(micro)
        if kd is not None:
            sums["kd"] = (sums["kd"] or 0.0) + kd.item() / len(micro)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def distillation_kl(dense_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(dense || model) of the next-token distributions, mean over unmasked positions
    (float32). dense_logits, logits: (B, L, V); mask: (B, L), 1 = a real token. Computed in blocks
    of positions (_BlockedKL): the reference below keeps five (B, L, V) float32 tensors for the
    backward pass, 5 GB at Gemma3's 262k-token vocabulary and 1,024 tokens a step. Measured at
    1,024 x 32k logits on CPU, one thread (perf/kl_memory.py): peak 297 MB above the inputs against
    643 MB, and 1.1-1.4 s forward and backward against 0.6 s (each block's softmaxes are computed
    again for the gradient). The saving needs large logits: at 1,024 x 8k the blocks' own temporaries
    make it 222 MB against 157 MB."""
    keep = mask.to(torch.float32)
    return _BlockedKL.apply(dense_logits.detach(), logits, keep)


class _BlockedKL(torch.autograd.Function):
    """`distillation_kl_reference`, one block of positions at a time, bit for bit.

    Forward keeps only its inputs (no new tensor) and (256, V) temporaries. Backward recomputes each
    block through the reference's own operations, so every row's gradient is the one autograd gives
    the reference: the same bits, hence the same training run (a closed-form gradient, or a
    different summation order, moved a distilled trial's held-out loss in the third decimal)."""

    BLOCK = 256  # positions at a time: (256, V) float32 temporaries

    @staticmethod
    def forward(ctx, dense_logits, logits, keep):
        vocab = logits.shape[-1]
        dense_rows, rows = dense_logits.reshape(-1, vocab), logits.reshape(-1, vocab)
        per_position = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, rows.shape[0], _BlockedKL.BLOCK):
            block = slice(start, start + _BlockedKL.BLOCK)
            per_position[block] = _BlockedKL._kl_rows(dense_rows[block], rows[block])
        ctx.save_for_backward(dense_logits, logits, keep)
        weights = keep.reshape(-1)
        return (per_position * weights).sum() / weights.sum()

    @staticmethod
    def backward(ctx, grad_output):
        dense_logits, logits, keep = ctx.saved_tensors
        vocab = logits.shape[-1]
        dense_rows, rows, weights = dense_logits.reshape(-1, vocab), logits.reshape(-1, vocab), keep.reshape(-1)
        upstream = grad_output / weights.sum()  # what the reference's division hands back
        grad = torch.empty_like(rows)
        for start in range(0, rows.shape[0], _BlockedKL.BLOCK):
            block = slice(start, start + _BlockedKL.BLOCK)
            with torch.enable_grad():
                student = rows[block].detach().requires_grad_()
                per_position = _BlockedKL._kl_rows(dense_rows[block], student)
                (grad[block],) = torch.autograd.grad(per_position, student, upstream * weights[block])
        return None, grad.reshape(logits.shape), None

    @staticmethod
    def _kl_rows(dense_rows, rows):
        """The reference's per-position KL, on (N, V) rows."""
        dense = torch.log_softmax(dense_rows.float(), dim=-1)
        student = torch.log_softmax(rows.float(), dim=-1)
        return (dense.exp() * (dense - student)).sum(dim=-1)


def distillation_kl_reference(dense_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain computation `distillation_kl` must match (tests/harness/test_train_memory.py)."""
    dense = torch.log_softmax(dense_logits.float(), dim=-1)
    student = torch.log_softmax(logits.float(), dim=-1)
    per_position = (dense.exp() * (dense - student)).sum(dim=-1)  # (B, L)
    keep = mask.to(per_position.dtype)
    return (per_position * keep).sum() / keep.sum()


def autocast(device: str, bf16: bool):
    """bf16 autocast on the device's type (CUDA or CPU), or none."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


def _crossed_decile(tokens: int, micro: list[dict], budget: int) -> bool:
    before = tokens - sum(b["tokens"] for b in micro)
    return tokens * 10 // budget > before * 10 // budget


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _save_state(model, optimizer, scheduler, summary: TrainSummary, path: Path, churn: ChurnMonitor | None) -> None:
    state = {
        "params": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "summary": summary.to_dict(),
        "router_rng": {name: layer.router.rng_state() for name, layer in factorized_layers(model)},
        "churn": None if churn is None else churn.state(),
    }
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp))
    except RuntimeError as error:  # torch's zip writer reports a full disk as "unexpected pos ..."
        free = shutil.disk_usage(path.parent).free
        if free >= DISK_FULL_BYTES:
            raise
        raise OSError(
            errno.ENOSPC,
            f"could not write the training checkpoint {path} ({free // 1024} KiB free on its disk): {error}",
        ) from error


def _load_state(model, optimizer, scheduler, summary: TrainSummary, path: Path, churn: ChurnMonitor | None) -> None:
    state = torch.load(path, weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for key, value in state["summary"].items():
        setattr(summary, key, value)
    summary.resumed_from_step = summary.steps
    layers = dict(factorized_layers(model))
    for name, rng in state["router_rng"].items():
        layers[name].router.set_rng_state(rng)
    if churn is not None and state.get("churn") is not None:
        churn.load_state(state["churn"])
    log.info("resumed from step %d (%d tokens) at %s", summary.steps, summary.tokens, path)
