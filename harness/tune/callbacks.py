"""Ray Tune callbacks of a sweep: one progress line per finished trial, the record of a trial a
scheduler stopped (its worker never gets to write one), Tune's result loggers, and Tune's
failure tracebacks moved off the console into the trial's own log. This module imports Ray:
the driver imports it only when a sweep runs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from ray.tune import Callback

from harness.config import TrialConfig
from harness.grid import Sweep
from harness.logs import FORMAT
from harness.train import SERIES_KEYS
from harness.tune.worker import record_path
from reports import record as record_module
from reports.record import write_record

log = logging.getLogger("harness.sweep")  # the sweep's lines, whoever prints them


class Progress(Callback):
    """Prints one line per finished trial ("[sweep 3/16, 812 s] <id>: completed avg_score=..."),
    one per retry and one per trial Ray gave up on; writes the record of a trial a scheduler
    stopped, and removes Tune's copies of a finished trial's training state unless the trial
    keeps its checkpoints. `sweep` and `storage` are None for a callback that only prints."""

    def __init__(self, total: int, max_failures: int = 0, sweep: Sweep | None = None, storage: Path | None = None):
        self.total, self.max_failures, self.sweep, self.storage = total, max_failures, sweep, storage
        self.done, self.start = 0, time.perf_counter()
        self.configs: dict[str, TrialConfig] = {t.trial_id: t for t in (sweep.trials if sweep else [])}

    def _line(self, text: str, *args) -> None:
        log.info("[sweep %d/%d, %.0f s] " + text, self.done, self.total, time.perf_counter() - self.start, *args)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "status" not in result:
            return  # an intermediate training result: shown by TensorBoard, not here
        self.done = count_with(trials, trial)
        shown = ("avg_score", "ffn_gflops", "prefill_speedup")
        numbers = ", ".join(f"{k}={v:.3f}" for k, v in result.items() if k in shown)
        error = f"({result['error']})" if result.get("error") else ""
        self._line("%s: %s %s%s", result.get("trial"), result.get("status"), numbers, error)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        config = self.configs.get(trial.config["params"]["id"])
        if config is None or self.storage is None:
            return  # not one of this sweep's trials
        name = self.sweep.name
        if not config.keep_checkpoints:  # Tune's copies of the training state, like the trial's own
            for copy in (self.storage / name / config.trial_id).glob("checkpoint_*"):
                shutil.rmtree(copy, ignore_errors=True)
        if "status" in last:
            return  # the worker reported its record
        self.done = count_with(trials, trial)
        path = record_path(config, self.storage, name)
        write_record(path, stopped_record(config, last, results_file(trial)))
        if not config.keep_checkpoints:
            from harness.trial import CHECKPOINT_DIR

            shutil.rmtree(path.parent / CHECKPOINT_DIR, ignore_errors=True)
        metric = self.sweep.scheduler.metric
        self._line(
            "%s: stopped by the scheduler at %s tokens (%s %.4f)",
            config.trial_id,
            last.get("tokens"),
            metric,
            last.get(metric, math.nan),
        )

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.info(
            "[sweep] %s: its worker failed; Ray retries it (failure %d of at most %d), resuming from its checkpoint",
            trial.config["params"]["id"],
            trial.num_failures,
            self.max_failures + 1,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        log.info(
            "[sweep] %s: failed %d time(s) in Ray; no retries left (failure.max_failures = %d)",
            trial.config["params"]["id"],
            trial.num_failures,
            self.max_failures,
        )


def count_with(trials, trial) -> int:
    """The finished trials, this one included (it is still RUNNING when Tune calls back),
    counted from the trials' states: a restored sweep (--resume) goes on counting."""
    return 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)


def results_file(trial) -> Path | None:
    """Tune's result.json of a trial (one JSON result per line), where its logger wrote it."""
    path = getattr(trial, "local_path", None) or getattr(trial, "path", None)
    return Path(path) / "result.json" if path else None


def stopped_record(config: TrialConfig, last: dict, results: Path | None) -> dict:
    """The record of a trial a scheduler stopped (reports/record.py), its training series read
    from Tune's result file."""
    series = []
    if results is not None and results.exists():
        for line in results.read_text().splitlines():
            try:
                result = json.loads(line)
            except ValueError:
                continue  # a line being written when the trial stopped
            if "status" not in result:
                series.append({k: result[k] for k in SERIES_KEYS if k in result})
    return record_module.stopped_record(config.describe(), {k: last[k] for k in SERIES_KEYS if k in last}, series)


class TrialErrorsToTrialLog(logging.Filter):
    """Ray Tune logs a worker's failure (a killed worker's ActorDiedError, say) with its whole
    traceback, some 24 lines, before the sweep's own one-line notice. This filter, on Tune's
    controller logger, appends that record, traceback included, to the trial's own log
    (records/<id>/trial.log) and keeps it off the console."""

    PREFIX = "Trial task failed for trial "
    LOGGER = "ray.tune.execution.tune_controller"

    def __init__(self, folders: dict[str, Path]):
        super().__init__()
        self.folders = folders  # trial id -> its record folder

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        folder = self.folders.get(message[len(self.PREFIX) :].strip()) if message.startswith(self.PREFIX) else None
        if folder is None:
            return True
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "trial.log", "a", encoding="utf-8") as log_file:
            log_file.write(logging.Formatter(FORMAT).format(record) + "\n")
        return False


def loggers(tracking: tuple[str, ...], name: str) -> list:
    """Tune's result files (result.json, progress.csv) always; TensorBoard event files and
    MLflow runs as `tracking` asks."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    out = [JsonLoggerCallback(), CSVLoggerCallback()]
    if "tensorboard" in tracking:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in tracking:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], experiment_name=name))
    return out
