"""The main job: a grid of FactorLLM trials dispatched by Ray Tune, then the report.

    python -m harness.sweep experiments/grid.yaml             # run (or continue) the sweep
    python -m harness.sweep experiments/grid.yaml --dry-run   # the expanded trials, then exit
    python -m harness.sweep experiments/grid.yaml --resume    # restore an interrupted sweep
    python -m harness.sweep grid.yaml --address auto          # join a running Ray cluster

Ray Tune's side (the trainable, callbacks, scheduler, cluster checks) is in harness/tune/.

Layout under `storage` (a local or shared NFS path; every node must see it):
  <storage>/<name>/records/<trial_id>/record.json    one record per trial (+ checkpoints)
  <storage>/baselines/<model fingerprint>/<trial_id>/ dense baselines, reused across sweeps
  <storage>/<name>/report/report.md                  the report, rebuilt after every run
  <storage>/<name>/ (Ray's own experiment state, for --resume)
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from harness.assets.cache import DISK_FULL_BYTES
from harness.config import ConfigError
from harness.grid import Scheduler, Sweep, load_grid, trial_table
from harness.logs import setup_console
from harness.tune.cluster import (
    ClusterUnreachable,
    check_reachable,
    largest_node,
    resolve_resources,
    tune_keeps_checkpoints,
)

# trial_worker by this module's name too: Tune states saved before harness/tune/ existed name it here
from harness.tune.worker import record_path, trial_worker
from reports.record import failed_record, output_problem, read_record, write_record

log = logging.getLogger("harness.sweep")  # by name: this module also runs as __main__
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def quiet_ray() -> None:
    """Keep Ray's own noise out of the user's way."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the loggers are chosen in `loggers`
    # intermediate results carry the held-out loss only every train.heldout_every steps: a
    # scheduler acts on the results that have its metric (ASHA waits for the next one)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # workers keep the driver's working directory (lm-eval asks git there for its hash)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


class DamagedState(RuntimeError):
    """Ray's saved experiment state cannot be read back."""


def restore_tuner(tune, experiment: Path, trainable):
    """Tuner.restore, with a damaged state turned into one actionable message."""
    try:
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    except Exception as error:  # Ray raises whatever its damaged files trigger (EOFError, KeyError, ...)
        raise DamagedState(
            f"Ray's experiment state in {experiment} cannot be restored "
            f"({type(error).__name__}: {error}). Completed trials are safe in their records: "
            f"run the same command without --resume, and only the unfinished trials run "
            f"again (their training checkpoints are reused)"
        ) from None


def use_callbacks(tuner, callbacks: list) -> None:
    """Tuner.restore brings back the callbacks the dead process pickled, with its clock (elapsed
    seconds counted from a perf_counter of another process) and its storage (stopped records
    written where the sweep used to be, if --storage changed): put this process's in their place.
    Ray 2.60 has no public setter for a restored tuner's run config."""
    run_config = getattr(getattr(tuner, "_local_tuner", None), "get_run_config", lambda: None)()
    if run_config is None:
        raise DamagedState(
            "this Ray version's restored Tuner has no run config to give fresh callbacks: run without --resume"
        )
    run_config.callbacks = callbacks


class SweepRunning(RuntimeError):
    """Another sweep of the same name holds the storage."""


@contextmanager
def sweep_lock(storage: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on <storage>/<name>/.sweep.lock for the sweep's duration:
    a second sweep of the same grid on the same storage is refused at once instead of
    computing every trial twice. (fcntl locks: local disks and NFSv4.)"""
    path = storage / name / ".sweep.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SweepRunning(
                f"sweep {name!r} is already running on {storage} ({holder}); wait for it to "
                f"finish, or give this one another name or storage"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_sweep(
    sweep: Sweep, storage: Path, *, resume: bool = False, address: str | None = None, cache_dir: str | None = None
) -> tuple[Sweep, dict[str, dict | None]]:
    """Dispatch every trial with Ray Tune; returns the sweep with its precision fixed for
    the cluster's workers and {trial_id: record or None if unfinished (Ctrl-C)}."""
    quiet_ray()
    import ray
    from ray import tune

    from harness.tune.callbacks import Progress, TrialErrorsToTrialLog, loggers
    from harness.tune.schedulers import make_scheduler

    storage.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        try:
            check_reachable(address)  # before Ray: it retries an unreachable head for minutes
            ray.init(
                address=address,
                include_dashboard=False,
                configure_logging=True,
                logging_level="ERROR",
                log_to_driver=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            if not address:
                raise
            raise ClusterUnreachable(
                f"could not join the Ray cluster at {address!r} ({type(error).__name__}: {str(error)[:300]}). "
                "Check that `ray start --head` runs there and its port (default 6379) is reachable from this "
                "machine, that this driver and every node run the same Ray and Python versions, and that "
                "RAY_AUTH_MODE is set the same way on the head, every worker node and this driver"
            ) from None
    nodes = ray.nodes()
    resources = resolve_resources(sweep.resources, ray.cluster_resources(), largest_node(nodes))
    sweep = sweep.with_precision(on_gpu=resources["gpu"] > 0)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_worker,
            storage=str(storage),
            name=sweep.name,
            cache_dir=cache_dir,
            cpus=sweep.resources.cpus_per_trial,
            copy_checkpoints=tune_keeps_checkpoints(nodes),
        ),
        resources,
    )
    experiment = storage / sweep.name
    callbacks = [
        Progress(len(sweep.trials), sweep.failure.max_failures, sweep, storage),
        *loggers(sweep.tracking, sweep.name),
    ]
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = restore_tuner(tune, experiment, trainable)
        use_callbacks(tuner, callbacks)
    else:
        # the label too: TensorBoard's hyperparameter view shows it beside each run (named by its id)
        params = [{"id": t.trial_id, "label": t.label, "config": t.to_dict()} for t in sweep.trials]
        tuner = tune.Tuner(
            trainable,
            param_space={"params": tune.grid_search(params)},
            tune_config=tune.TuneConfig(
                scheduler=make_scheduler(sweep.scheduler),
                max_concurrent_trials=sweep.resources.max_concurrent_trials or None,
                reuse_actors=True,  # keeps imports and the lm-eval task index warm
                trial_name_creator=lambda t: t.config["params"]["id"],
                trial_dirname_creator=lambda t: t.config["params"]["id"],
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(storage),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.failure.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest training state
                callbacks=callbacks,
            ),
        )
    moved = TrialErrorsToTrialLog({t.trial_id: record_path(t, storage, sweep.name).parent for t in sweep.trials})
    tune_logger = logging.getLogger(TrialErrorsToTrialLog.LOGGER)
    tune_logger.addFilter(moved)
    try:
        results = fit(tuner, storage)
    except KeyboardInterrupt:
        return sweep, collect_records(sweep, storage)
    except RayStopped as error:  # finished records are kept, and the report says what is unfinished
        log.error("%s", error)
        return sweep, collect_records(sweep, storage)
    finally:
        tune_logger.removeFilter(moved)
    return sweep, collect_records(sweep, storage, results)


class RayStopped(RuntimeError):
    """Ray Tune's controller itself stopped (e.g. its memory monitor killed a worker: Tune 2.60
    raises from fit() instead of failing that trial); the message is one line."""


def fit(tuner, storage: Path):
    """tuner.fit(), except that a failure with the storage disk (nearly) full is an OSError
    saying so: Ray reports a full disk as whatever reading its truncated state raises
    (an EOFError on a 2 MB tmpfs)."""
    try:
        return tuner.fit()
    except Exception as error:
        free = shutil.disk_usage(storage).free
        if free < DISK_FULL_BYTES:
            raise OSError(
                errno.ENOSPC, f"Ray stopped ({type(error).__name__}: {error}) with {free // 1024} KiB free on the disk"
            ) from error
        if isinstance(error, RuntimeError):
            raise RayStopped(f"Ray Tune stopped the sweep: {ray_reason(error)}") from error
        raise


def ray_reason(error: Exception) -> str:
    """The one line of a Ray error that says why (an OOM kill names the memory it saw)."""
    lines = [line.strip() for line in ANSI.sub("", str(error)).splitlines() if line.strip()]
    memory = [line for line in lines if "running low on memory" in line or line.startswith("OOM kill reason")]
    return " ".join(memory)[:600] if memory else (lines[0][:600] if lines else type(error).__name__)


def collect_records(sweep: Sweep, storage: Path, results=None) -> dict[str, dict | None]:
    """Each trial's record; a trial Ray gave up on gets a failed record with Ray's reason."""
    errors = {}
    for result in results or []:
        if result.error is not None and result.config:
            errors[result.config["params"]["id"]] = ANSI.sub("", str(result.error)).strip()
    records = {}
    for config in sweep.trials:
        path = record_path(config, storage, sweep.name)
        record = read_record(path)
        if record is not None:
            records[config.trial_id] = record
        elif config.trial_id in errors:
            record = failed_record(config.describe(), "ray: " + errors[config.trial_id].splitlines()[-1][:2000])
            write_record(path, record)
            records[config.trial_id] = record
        else:
            records[config.trial_id] = None  # never finished (interrupted)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid YAML (see experiments/)")
    parser.add_argument("--dry-run", action="store_true", help="print the expanded trial table and exit")
    parser.add_argument("--resume", action="store_true", help="restore an interrupted sweep of the same name")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join a Ray cluster (e.g. auto or host:6379); default: start Ray locally",
    )
    parser.add_argument("--storage", default=None, help="override the grid's storage path")
    parser.add_argument("--cache-dir", default=None, help="model/corpus cache (default $FACTORLLM_CACHE)")
    parser.add_argument(
        "--no-scheduler",
        action="store_true",
        help="run every trial to its budget, ignoring the grid's scheduler, as the sweep <name>-full (to "
        "compare early stopping against the full grid)",
    )
    args = parser.parse_args(argv)
    setup_console()
    if args.storage and (why := output_problem(args.storage, folder=True)):
        log.error("--storage %s", why)
        return 2
    try:
        sweep = load_grid(args.grid)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    if args.no_scheduler:
        sweep = replace(sweep, name=f"{sweep.name}-full", scheduler=Scheduler())
    sweep = sweep.with_precision(on_gpu=_expect_gpu(sweep))
    log.info(trial_table(sweep))
    if args.dry_run:
        log.info(
            "(precision auto is fixed by where trials run: fp32 on CPU workers, bf16 on GPU workers; "
            "shown for %s workers)",
            "GPU" if _expect_gpu(sweep) else "CPU",
        )
        return 0
    storage = Path(args.storage or sweep.storage).expanduser().resolve()
    start = time.perf_counter()
    try:
        with sweep_lock(storage, sweep.name):
            try:
                sweep, records = run_sweep(
                    sweep, storage, resume=args.resume, address=args.address, cache_dir=args.cache_dir
                )
            except KeyboardInterrupt:  # before Ray started dispatching
                records = collect_records(sweep, storage)
            return finish(sweep, storage, records, time.perf_counter() - start, args.grid)
    except (SweepRunning, DamagedState, ClusterUnreachable) as error:
        log.error("%s", error)
        return 2
    except OSError as error:  # e.g. a full disk under storage: one line, not a traceback
        log.error("%s: %s (storage %s); records already written are kept", type(error).__name__, error, storage)
        return 1


def _expect_gpu(sweep: Sweep) -> bool:
    """Whether trials will get a GPU, judged on this machine (the cluster decides at run time)."""
    gpus = sweep.resources.gpus_per_trial
    if gpus != "auto":
        return float(gpus) > 0
    import torch

    return torch.cuda.is_available()


def finish(sweep: Sweep, storage: Path, records: dict, seconds: float, grid_path: str) -> int:
    from reports.build import build_sweep_report, write_manifest

    unfinished = [tid for tid, r in records.items() if r is None]
    failed = [tid for tid, r in records.items() if r and r["status"] not in ("completed", "stopped")]
    stopped = [tid for tid, r in records.items() if r and r["status"] == "stopped"]
    sweep_dir = storage / sweep.name
    write_manifest(
        sweep_dir,
        f"Sweep {sweep.name} ({grid_path})",
        {t.trial_id: record_path(t, storage, sweep.name) for t in sweep.trials},
        [t.describe() for t in sweep.trials],
        [s.__dict__ for s in sweep.skipped],
    )
    report = build_sweep_report(sweep_dir)
    log.info(
        "sweep %s: %d completed, %d stopped early, %d failed, %d unfinished in %.1f min",
        sweep.name,
        len(records) - len(unfinished) - len(failed) - len(stopped),
        len(stopped),
        len(failed),
        len(unfinished),
        seconds / 60,
    )
    log.info("report: %s", report)
    if unfinished:
        log.info("unfinished: resume with  python -m harness.sweep %s --resume", grid_path)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
