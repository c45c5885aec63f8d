"""The trainable Ray Tune runs per trial, and where a trial's record lives."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from harness.assets.models import model_fingerprint
from harness.config import TrialConfig
from harness.logs import setup_console
from harness.train import SCHEDULER_METRICS, SCHEDULER_TIME, TRAIN_STATE
from reports.record import RECORD_FILE

log = logging.getLogger(__name__)


def trial_dir(config: TrialConfig, storage: Path, name: str) -> Path:
    """Where a trial's record lives: dense baselines are shared by every sweep in `storage`."""
    if config.is_dense:
        fingerprint = hashlib.sha256(model_fingerprint(config.model).encode()).hexdigest()[:12]
        return storage / "baselines" / fingerprint
    return storage / name / "records"


def record_path(config: TrialConfig, storage: Path, name: str) -> Path:
    return trial_dir(config, storage, name) / config.trial_id / RECORD_FILE


def trial_worker(
    tune_config: dict, storage: str, name: str, cache_dir: str | None, cpus: int, copy_checkpoints: bool = True
) -> None:
    """Runs inside a Ray worker: one trial. Each intermediate training result goes to Tune as
    it comes (`tune.report`), so Tune's result files, TensorBoard and schedulers see the trial
    while it runs; then one final report with the record's numbers. A trial restarted by Ray (a
    retry, --resume, another node) resumes from its own checkpoint folder, or from Tune's copy
    when that folder is gone (`tune.get_checkpoint()`). Tune gets that copy only where it can
    help (`copy_checkpoints`: several nodes, where a retry may land elsewhere): on one machine
    it would double the disk a training checkpoint takes (~1 GB on SmolLM2: expert slices and
    Adam state) for nothing."""
    import ray
    import torch
    from ray import tune

    from harness.assets.models import use_offline_mode_if_hub_unreachable
    from harness.trial import CHECKPOINT_DIR, run_trial

    torch.set_num_threads(cpus)
    use_offline_mode_if_hub_unreachable()
    config = TrialConfig.from_dict(tune_config["params"]["config"])
    where = {"ray_node_id": ray.get_runtime_context().get_node_id(), "ray_node_ip": ray.util.get_node_ip_address()}
    setup_console()  # in the worker: its stdout is what Ray forwards to the driver's console
    out_dir = trial_dir(config, Path(storage), name)
    restore_checkpoint(tune.get_checkpoint(), out_dir / config.trial_id / CHECKPOINT_DIR)
    last: dict = {}

    def report(point: dict, checkpoint: Path | None) -> None:
        last.update(point)
        saved = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint and copy_checkpoints else None
        tune.report(dict(point), checkpoint=saved)

    record = run_trial(config, out_dir, cache_dir=cache_dir, where=where, on_report=report)
    tune.report(tune_metrics(record) | {k: last[k] for k in (SCHEDULER_TIME, *SCHEDULER_METRICS) if k in last})


def restore_checkpoint(checkpoint, local: Path) -> None:
    """Tune's copy of a trial's training checkpoint into the trial's own folder, when that
    folder has none (a trial moved to another node, or its folder was lost)."""
    if checkpoint is None or (local / TRAIN_STATE).exists():
        return
    with checkpoint.as_directory() as folder:
        if (Path(folder) / TRAIN_STATE).exists():
            local.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder) / TRAIN_STATE, local / TRAIN_STATE)
            log.info("restored the training checkpoint from Tune's copy into %s", local)


def tune_metrics(record: dict) -> dict:
    """The few numbers Tune shows per trial (completed ones only)."""
    out = {"status": record["status"], "trial": record["trial_id"]}  # Ray owns the `trial_id` key
    if record.get("error"):
        out["error"] = short_text(record["error"])
    metrics = record.get("metrics") or {}
    if metrics:
        out["avg_score"] = sum(m["value"] for m in metrics.values()) / len(metrics)
    if record.get("flops"):
        out["ffn_gflops"] = record["flops"]["ffn_gflops_per_token"]
    if record.get("speedup"):
        out["prefill_speedup"] = record["speedup"]["prefill"]
    if record.get("heldout"):
        out["heldout_loss_full"] = record["heldout"]["loss"]
    return out


def short_text(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters (whitespace runs, newlines included, become one space)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
