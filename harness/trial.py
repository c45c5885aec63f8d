"""One FactorLLM trial end to end; the unit Ray dispatches and a researcher debugs.

    python -m harness.trial experiments/trials/smollm2_1r4e2k_par.yaml [--out runs/trials]

load -> (dense reference FLOPs/latency) -> (calibrate) -> factorize -> (layer-wise) -> train (PAR)
-> evaluate -> count FLOPs -> measure latency -> analyse routing -> write <out>/<trial_id>/record.json.
The record is written atomically and always says `completed` or `failed` (with the
reason); a failed trial carries no metrics. Training checkpoints let a rerun of
the same trial resume where it stopped; a completed record is never recomputed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

from factorllm_core import calibrate, defactorize, factorize, factorized_layers, save_trained_ffns
from harness.assets.corpora import pack, resolve_corpus, token_budget
from harness.assets.models import (
    load_model,
    memory_problem,
    pretraining_tokens,
    resolve_device,
    use_offline_mode_if_hub_unreachable,
)
from harness.config import DEVICE, ConfigError, TrialConfig, resolve_precision
from harness.environment import environment
from harness.eval.benchmarks import evaluate, make_lm
from harness.eval.heldout import document_bytes, first_tokens, heldout_measures, heldout_sequences, next_token_logprobs
from harness.grid import served_problems
from harness.layerwise import layerwise_fit
from harness.logs import setup_console, trial_log
from harness.measure.analysis import ChurnMonitor, analyze_routing
from harness.measure.flops import count_dense_flops_cached, count_flops
from harness.measure.latency import measure_latency
from harness.measure.probe import probe_tokens
from harness.measure.served import served_latency
from harness.train import dense_teacher, make_batches, train
from reports.record import (
    RECORD_FILE,
    new_record,
    non_finite_paths,
    output_problem,
    read_record,
    write_json_atomic,
    write_record,
)

# by name, not __name__: this module also runs as __main__
log = logging.getLogger("harness.trial")  # the console's: one line per stage and per finished trial
detail = logging.getLogger("harness.trial.detail")  # the trial log's only
LOG_FILE = "trial.log"
MODEL_DIR = "model"  # the trained factorized layers (factorllm_core.save_trained_ffns) + source.json
SOURCE_FILE = "source.json"
CHECKPOINT_DIR = "checkpoint"
ANALYSIS_TOKENS = 512  # held-out probe tokens for routing statistics and expert similarity
CHURN_TOKENS = 256  # probe tokens whose routing churn is followed during training


class TrialFailed(RuntimeError):
    pass


class Trial:
    """Holds one trial's state between stages; `run` drives them and writes the record."""

    def __init__(
        self,
        config: TrialConfig,
        out_dir: Path,
        cache_dir: str | Path | None = None,
        on_train_step: Callable[[int], None] | None = None,
        where: dict | None = None,
        console_loggers: tuple[str, ...] = ("harness.trial",),
        on_report: Callable[[dict, Path | None], None] | None = None,
    ):
        """`where`: facts about the place it runs that the record should carry (a Ray
        worker adds its node id and IP). `console_loggers`: whose progress shows on the
        console while the trial runs (everything goes to <trial dir>/trial.log).
        `on_report`: each intermediate training result and the checkpoint folder written
        with it, if any (harness/train.py; a Ray worker reports them to Tune)."""
        self.config, self.cache_dir = config, cache_dir
        self.dir = Path(out_dir) / config.trial_id
        self.on_train_step, self.console_loggers, self.on_report = on_train_step, console_loggers, on_report
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.record = new_record(config.describe(), environment=environment(self.device) | (where or {}))

    @contextmanager
    def stage(self, name: str):
        detail.info("[%s] %s ...", self.config.trial_id, name)
        start = time.perf_counter()
        yield
        self.record["stage_seconds"][name] = round(time.perf_counter() - start, 3)
        log.info("[%s] %s done in %.1f s", self.config.trial_id, name, self.record["stage_seconds"][name])

    def run(self) -> dict:
        """Run every stage, logging to <trial dir>/trial.log, and write the record."""
        with trial_log(self.dir / LOG_FILE, self.console_loggers):
            detail.info("trial %s (%s)", self.config.trial_id, self.config.label)
            return self._run()

    def _run(self) -> dict:
        self.record["started_at"] = _now()
        try:
            self._run_stages()
            self._check_finite()
            self.record["status"] = "completed"
            self.record["files"] = self._files()
        except KeyboardInterrupt:
            raise  # leave checkpoints for a resume; an interrupted trial writes no record
        except Exception as error:  # every failure is recorded with its reason
            self.record.update(
                status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8)
            )
            for key in ("metrics", "flops", "latency", "speedup", "routing", "heldout"):
                self.record.pop(key, None)  # a failed trial never reports numbers as results
        self.record["finished_at"] = _now()
        write_record(self.dir / RECORD_FILE, self.record)
        if self.record["status"] == "completed" and not self.config.keep_checkpoints:
            shutil.rmtree(self.dir / CHECKPOINT_DIR, ignore_errors=True)  # only after the record is safe
        log.info(
            "[%s] %s%s: %s",
            self.config.trial_id,
            self.record["status"],
            f" ({self.record['error']})" if self.record["error"] else "",
            self.dir / RECORD_FILE,
        )
        return self.record

    def _run_stages(self) -> None:
        with self.stage("load"):
            self._load()
        if not self.config.is_dense:
            with self.stage("dense_reference"):
                self.record["dense_reference"] = self._dense_reference()
            calibration = None
            if self.config.train.calibration_tokens:
                with self.stage("calibrate"):
                    calibration = self._calibrate()
            with self.stage("factorize"):
                self.record["factorization"] = factorize(self.model, self.config.factor, calibration).to_dict()
                for _, layer in factorized_layers(self.model):  # training, evaluation, FLOPs, analysis
                    layer.experts.dispatch = self.config.dispatch
                self.record["routing_at_factorization"] = analyze_routing(
                    self.model, self.probe[:, :ANALYSIS_TOKENS], self.device
                )["summary"]
            # the distillation teacher: the dense model, taken before the layer-wise stage moves the experts
            self._teacher = dense_teacher(self.model) if self.config.train.lambda_kd else None
            if self.config.train.layerwise_steps:
                with self.stage("layerwise"):
                    t = self.config.train
                    self.record["layerwise"] = layerwise_fit(
                        self.model, calibration, t.layerwise_steps, t.layerwise_lr, self.device, self.config.seed
                    )
            del calibration  # 283 MB on SmolLM2 at 4,096 tokens
            with self.stage("train"):
                self._train()
                self._save_model()
        with self.stage("evaluate"):
            self._evaluate()
        with self.stage("heldout"):
            self.record["heldout"] = heldout_measures(
                self.model, self.heldout, self.device, self.dense_logprobs, self.heldout_bytes
            )
            self.dense_logprobs = None
        with self.stage("measure"):
            self._measure()
        if not self.config.is_dense:
            with self.stage("analyze"):
                self.record["routing"] = analyze_routing(self.model, self.probe[:, :ANALYSIS_TOKENS], self.device)

    def _load(self) -> None:
        loaded = load_model(
            self.config.model,
            dtype=torch.float32,
            device=self.device,
            cache_dir=self.cache_dir,
            trust_remote_code=self.config.trust_remote_code,
        )
        self.model, self.tokenizer, self._source = loaded.model, loaded.tokenizer, loaded.source
        cfg = self.model.config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or self.config.flops.seq_len
        self.flops_len = min(self.config.flops.seq_len, self.max_len)
        self.probe = probe_tokens(self.tokenizer, max(self.flops_len, self.config.latency.prefill_len, ANALYSIS_TOKENS))
        self.heldout = heldout_sequences(self.tokenizer, self.config.eval, self.max_len)
        self.heldout_bytes = document_bytes(self.config.eval) if self.config.eval.heldout_documents else None
        self.dense_logprobs = None  # the dense model's, for KL(dense || factorized); set before factorizing
        self._tokens = None  # the data budget's tokens, drawn when first needed
        self.record["model"] = {
            "name": self.config.model,
            "kind": loaded.source.kind,
            "fingerprint": loaded.source.fingerprint,
            "architecture": type(self.model).__name__,
            "n_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "ffn_width": cfg.intermediate_size,
            "params": sum(p.numel() for p in self.model.parameters()),
            # with the above, what a decode step reads (reports/scaling.py): one embedding row, the head in full
            "vocab_size": cfg.vocab_size,
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "pretraining_tokens": pretraining_tokens(self.config.model),
        }
        self.record["eval_dtype"] = str(self._eval_dtype()).removeprefix("torch.")
        self.record["precision"] = self.precision  # bf16: evaluation in bf16 and bf16 autocast in training

    def _dense_reference(self) -> dict:
        """Before factorization, in the evaluation dtype (a bf16 copy on GPU, so the fp32
        weights that training needs survive): the dense model's FLOPs, and its
        next-token log-probabilities on the held-out text, kept for the KL."""
        dense = self._in_eval_dtype(self.model)
        self.dense_logprobs = next_token_logprobs(dense, self.heldout, self.device)
        if not self.config.flops.enabled:
            return {}
        return {
            "flops": count_dense_flops_cached(dense, self.probe[:, : self.flops_len].to(self.device), self.cache_dir)
        }

    def _measure(self) -> None:
        """FLOPs of this model; latency of this model and, for a factorized one, of its
        merged dense equivalent, timed interleaved so that the speedup is fair."""
        if self.config.flops.enabled:
            count = (
                count_flops if not self.config.is_dense else partial(count_dense_flops_cached, cache_dir=self.cache_dir)
            )
            self.record["flops"] = count(self.model, self.probe[:, : self.flops_len].to(self.device))
        if not self.config.latency.enabled:
            return
        models = {"model": self.model}
        if not self.config.is_dense:
            models["dense"] = defactorize(copy.deepcopy(self.model))
        latency = measure_latency(models, self.probe, self.config.latency, self.device)
        self.record["latency"] = latency["model"]
        if not self.config.is_dense:
            self.record["dense_reference"]["latency"] = latency["dense"]
            self.record["speedup"] = _speedup(latency["dense"], latency["model"])
            if self.config.latency.engine == "llama.cpp":
                del models
                self.record["served"] = self._served()

    def _served(self) -> dict:
        """Served latency, or its failure with the reason: never at the cost of the trial's other results."""
        lat = self.config.latency
        try:
            return served_latency(
                self.dir / MODEL_DIR,
                self._source,
                self.tokenizer,
                self.probe,
                lat.prefill_len,
                lat.decode_tokens,
                lat.repeats,
                torch.get_num_threads(),
                self.cache_dir,
            )
        except Exception as error:  # noqa: BLE001 - recorded with its reason; the rest of the record stands
            detail.warning("served latency failed: %s", traceback.format_exc(limit=4))
            return {"engine": "llama.cpp", "error": f"{type(error).__name__}: {error}"}

    def _in_eval_dtype(self, model):
        dtype = self._eval_dtype()
        return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)

    def _eval_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _budget_tokens(self) -> torch.Tensor:
        """The trial's data budget, drawn once from the corpus with the trial seed: the
        first train.calibration_tokens calibrate, the rest train (never the same tokens)."""
        if self._tokens is None:
            cfg = self.config.train
            self._tokens = token_budget(
                resolve_corpus(cfg.corpus),
                self.tokenizer,
                cfg.data_budget_tokens,
                seed=self.config.seed,
                cache_dir=self.cache_dir,
            )
        return self._tokens

    def _calibrate(self):
        """The dense model's FFN inputs on the calibration tokens (forward only)."""
        cfg = self.config.train
        sequences = pack(self._budget_tokens()[: cfg.calibration_tokens], min(cfg.seq_len, self.max_len))
        calibration = calibrate(self.model, sequences, self.device)
        self.record["calibration"] = {
            "tokens": calibration.tokens,
            "sequences": len(sequences),
            "corpus": cfg.corpus,
            "seed": self.config.seed,
            "note": "the first calibration_tokens of the trial's data budget",
        }
        return calibration

    def _train(self) -> None:
        cfg = self.config.train
        teacher, self._teacher = self._teacher, None  # held only until training
        train_tokens = cfg.data_budget_tokens - cfg.calibration_tokens
        if train_tokens == 0:
            self.record["training"] = {"tokens": 0, "steps": 0, "note": "no training tokens left in the data budget"}
            return
        tokens = self._budget_tokens()[cfg.calibration_tokens :]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batches = make_batches(pack(tokens, min(cfg.seq_len, self.max_len)), cfg.batch_size, pad or 0)
        summary = train(
            self.model,
            batches,
            cfg,
            self.device,
            self.dir / CHECKPOINT_DIR,
            on_step=self.on_train_step,
            churn=self._churn_monitor(math.ceil(len(batches) / cfg.grad_accum)),
            bf16=self.precision == "bf16",
            teacher=teacher,
            heldout=self._heldout_slice_loss if cfg.heldout_every else None,
            on_report=self.on_report,
        )
        if summary.tokens != train_tokens:
            raise TrialFailed(
                f"trained on {summary.tokens} tokens, budget {cfg.data_budget_tokens} less "
                f"{cfg.calibration_tokens} calibration tokens = {train_tokens}"
            )
        self.record["training"] = summary.to_dict()

    def _heldout_slice_loss(self) -> float:
        """Mean next-token loss on the held-out text's first train.heldout_slice_tokens (whole
        sequences or documents, at least one): the same fixed slice every time."""
        rows = first_tokens(self.heldout, self.config.train.heldout_slice_tokens)
        return heldout_measures(self.model, rows, self.device)["loss"]

    def _save_model(self) -> None:
        """The trained factorized layers (fp32, before evaluation may cast the model) and
        what rebuilds the whole model from them: its source model and that model's
        fingerprint (harness/trial_folder.py checks it)."""
        folder = self.dir / MODEL_DIR
        save_trained_ffns(self.model, folder)
        source = {k: self.record["model"][k] for k in ("name", "fingerprint", "architecture")}
        write_json_atomic(folder / SOURCE_FILE, source)

    def _files(self) -> dict:
        """What this trial leaves on disk, in bytes: its trained weights, and the training
        checkpoint (removed once the record is written unless keep_checkpoints)."""
        model, checkpoint = self.dir / MODEL_DIR, self.dir / CHECKPOINT_DIR
        return {
            "model": MODEL_DIR if model.exists() else None,
            "model_bytes": _bytes(model),
            "checkpoint_bytes": _bytes(checkpoint),
            "checkpoint_kept": self.config.keep_checkpoints,
        }

    def _churn_monitor(self, total_steps: int) -> ChurnMonitor | None:
        """None when churn is switched off, or when routing is random (no router to
        settle, and probing would draw from the random-routing generator)."""
        from factorllm_core import ROUTER_MODES

        if not self.config.train.churn_points or ROUTER_MODES.get(self.config.factor.router_mode).random_choice:
            return None
        every = max(1, math.ceil(total_steps / self.config.train.churn_points))
        return ChurnMonitor(self.model, self.probe[:, :CHURN_TOKENS], self.device, every)

    def _evaluate(self) -> None:
        ev = self.config.eval
        self.model.to(self._eval_dtype()).eval()
        if not ev.benchmarks:
            detail.info("benchmarks off (eval.benchmarks: false)")
            return
        lm = make_lm(ev.lm, self.model, self.tokenizer, ev.batch_size, self.device)
        results = evaluate(
            lm,
            ev.task_names(),
            limit=ev.limit,
            source=ev.source,
            num_fewshot=ev.num_fewshot,
            sample_seed=ev.sample_seed,
        )
        self.record["metrics"] = {name: r.to_dict() for name, r in results.items()}
        self.record["eval_lm"] = {
            "lm": ev.lm,
            "requests": dict(getattr(lm, "paths", {})),
            "hflm_reason": getattr(lm, "hflm_reason", None),
        }

    def _check_finite(self) -> None:
        bad = non_finite_paths(
            {k: self.record.get(k) for k in ("metrics", "flops", "latency", "training", "heldout", "layerwise")}
        )
        if bad:
            raise TrialFailed(f"non-finite values at {', '.join(bad[:5])}")


def _speedup(dense: dict | None, factored: dict | None) -> dict | None:
    if not dense or not factored:
        return None
    return {
        "prefill": factored["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "decode": dense["decode_ms_per_token"] / factored["decode_ms_per_token"],
        # per interleaved round: dense time / factorized time (the spread behind the medians)
        "prefill_rounds": [d / f for d, f in zip(dense["prefill_ms_rounds"], factored["prefill_ms_rounds"])],
        "decode_rounds": [
            d / f for d, f in zip(dense["decode_ms_per_token_rounds"], factored["decode_ms_per_token_rounds"])
        ],
        "device": factored["device"],
    }


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def existing_record(config: TrialConfig, out_dir: Path) -> dict | None:
    record = read_record(Path(out_dir) / config.trial_id / RECORD_FILE)
    return record if record and record.get("status") == "completed" else None


def run_trial(config: TrialConfig, out_dir: str | Path, **kwargs) -> dict:
    """Run (or resume) one trial; a completed record in `out_dir` is returned as is."""
    done = existing_record(config, Path(out_dir))
    if done is not None:
        return done
    return Trial(config, Path(out_dir), **kwargs).run()


def summary_lines(record: dict) -> list[str]:
    lines = [f"trial {record['trial_id']} ({record['label']}): {record['status']}"]
    if record["error"]:
        lines.append(f"  error: {record['error']}")
    lines.append("  stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in record["stage_seconds"].items()))
    for name, m in record.get("metrics", {}).items():
        stderr = "n/a" if m["stderr"] is None else f"{m['stderr']:.3f}"
        lines.append(f"  {name:14s} {m['metric']:8s} {m['value']:.4f} +- {stderr} (n={m['n']})")
    if record.get("heldout"):
        h = record["heldout"]
        kl = f", KL(dense || model) {h['kl_from_dense']:.4f}" if "kl_from_dense" in h else ""
        lines.append(f"  held-out LM loss {h['loss']:.4f} (ppl {h['perplexity']:.1f}, {h['tokens']} tokens){kl}")
    if "flops" in record:
        f = record["flops"]
        lines.append(
            f"  GFLOPs/token: attention {f['attention_gflops_per_token']:.4f}, ffn "
            f"{f['ffn_gflops_per_token']:.4f}, total {f['total_gflops_per_token']:.4f}"
        )
    if record.get("speedup"):
        lines.append(
            f"  speedup vs dense: prefill {record['speedup']['prefill']:.2f}x, "
            f"decode {record['speedup']['decode']:.2f}x"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="trial YAML")
    parser.add_argument("--out", default="runs/trials", help="records go to <out>/<trial_id>/record.json")
    parser.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda)")
    parser.add_argument("--cache-dir", default=None, help="model/corpus cache (default $FACTORLLM_CACHE)")
    args = parser.parse_args(argv)
    setup_console()
    try:  # every argument is checked before anything loads
        if why := output_problem(args.out, folder=True):
            raise ValueError(f"--out {why}")
        if args.device is not None and not DEVICE.match(args.device):
            raise ValueError(f"--device {args.device!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
        config = TrialConfig.from_yaml(args.config)
        if args.device:
            config = replace(config, device=args.device)
        resolve_device(config.device)
        if served := served_problems([config]):
            raise ConfigError(served, args.config)
        if why := memory_problem(config.model):  # before anything is allocated
            raise ConfigError([f"model: {why}"], args.config)
    except (ConfigError, OSError, ValueError) as error:
        log.error("%s", error)
        return 2
    use_offline_mode_if_hub_unreachable()
    try:  # one trial in a terminal: training progress shows too
        record = run_trial(
            config, args.out, cache_dir=args.cache_dir, console_loggers=("harness.trial", "harness.train")
        )
    except OSError as error:  # the record itself could not be written (a full disk): one line
        log.error("%s: %s (under %s)", type(error).__name__, error, args.out)
        return 1
    log.info("\n".join(summary_lines(record)))
    return 0 if record["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
