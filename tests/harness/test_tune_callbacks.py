"""The sweep's Ray Tune callbacks, each driven by hand with fake trials (what Tune passes: a
trial with `config`, `status`, `last_result`, `num_failures` and its result folder)."""

import json
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from harness.config import TrialConfig  # noqa: E402
from harness.grid import expand_grid  # noqa: E402
from harness.tune.callbacks import Progress, TrialErrorsToTrialLog, loggers, stopped_record  # noqa: E402
from harness.tune.worker import record_path  # noqa: E402
from reports.record import read_record  # noqa: E402


@pytest.fixture
def lines(caplog):
    """The sweep's console lines, as logged."""
    caplog.set_level(logging.INFO, logger="harness.sweep")

    def read() -> list[str]:
        out = [r.getMessage() for r in caplog.records if r.name == "harness.sweep"]
        caplog.clear()
        return out

    return read


def fake_trial(trial_id: str, status: str = "RUNNING", last_result=None, path=None, failures: int = 0):
    return SimpleNamespace(
        config={"params": {"id": trial_id}},
        status=status,
        last_result=last_result,
        local_path=path,
        num_failures=failures,
    )


@pytest.fixture
def asha_sweep(tmp_path):
    data = {
        "name": "cb",
        "storage": str(tmp_path),
        "axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [1, 2]},
        "train": {"data_budget_tokens": 4096, "heldout_every": 1},
        "scheduler": {"type": "asha", "grace_tokens": 512, "max_tokens": 4096},
        "dense_baseline": False,
    }
    return expand_grid(data, check_models=False)


def test_progress_prints_one_line_per_finished_trial_and_ignores_training_results(lines):
    progress = Progress(total=3)
    running = fake_trial("a")
    progress.on_trial_result(0, [running], running, {"tokens": 64, "lm": 3.0})  # intermediate: silent
    assert lines() == []
    result = {"trial": "a", "status": "completed", "avg_score": 0.4567, "ffn_gflops": 1.0, "lm": 9.0}
    progress.on_trial_result(0, [running], running, result)
    (line,) = lines()
    assert line.startswith("[sweep 1/3, ") and line.endswith("a: completed avg_score=0.457, ffn_gflops=1.000")
    failed = {"trial": "b", "status": "failed", "error": "boom"}
    progress.on_trial_result(0, [running, fake_trial("b")], fake_trial("b"), failed)
    assert lines()[0].endswith("b: failed (boom)")


def test_the_progress_counter_goes_on_after_resume(lines):
    """After --resume, Tune's restored trials are TERMINATED already: the count continues."""
    progress = Progress(total=4)
    done = [fake_trial(f"t{i}", "TERMINATED") for i in range(2)]
    running = fake_trial("t3")
    trials = [*done, running, fake_trial("t4", "PENDING")]
    progress.on_trial_result(0, trials, running, {"trial": "t3", "status": "completed"})
    assert lines()[0].startswith("[sweep 3/4, ")


def test_retries_are_announced_in_one_line(lines):
    progress = Progress(total=3, max_failures=2)
    trial = fake_trial("1R4E2K-abc", failures=1)
    progress.on_trial_recover(0, [], trial)
    trial.num_failures = 3
    progress.on_trial_error(0, [], trial)
    assert lines() == [
        "[sweep] 1R4E2K-abc: its worker failed; Ray retries it (failure 1 of at most 3), resuming from its checkpoint",
        "[sweep] 1R4E2K-abc: failed 3 time(s) in Ray; no retries left (failure.max_failures = 2)",
    ]


def test_a_trial_the_scheduler_stopped_gets_its_record_and_loses_its_checkpoints(asha_sweep, tmp_path, lines):
    config = asha_sweep.trials[0]
    tune_dir = tmp_path / "cb" / config.trial_id
    (tune_dir / "checkpoint_000001").mkdir(parents=True)  # Tune's copy of the training state
    results = [{"step": s, "tokens": 512 * s, "heldout_loss": 7.0 - s} for s in (1, 2)]
    (tune_dir / "result.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    own = record_path(config, tmp_path, "cb").parent / "checkpoint"
    own.mkdir(parents=True)
    progress = Progress(len(asha_sweep.trials), 0, asha_sweep, tmp_path)
    trial = fake_trial(config.trial_id, last_result=results[-1], path=str(tune_dir))
    progress.on_trial_complete(0, [trial], trial)
    record = read_record(record_path(config, tmp_path, "cb"))
    assert record["status"] == "stopped" and record["stopped"]["tokens"] == 1024
    assert [p["step"] for p in record["training"]["series"]] == [1, 2]
    assert not (tune_dir / "checkpoint_000001").exists() and not own.exists()
    assert lines()[0].endswith("stopped by the scheduler at 1024 tokens (heldout_loss 5.0000)")


def test_a_trial_that_wrote_its_own_record_is_left_to_it(asha_sweep, tmp_path, lines):
    config = asha_sweep.trials[1]
    tune_dir = tmp_path / "cb" / config.trial_id
    (tune_dir / "checkpoint_000003").mkdir(parents=True)
    progress = Progress(len(asha_sweep.trials), 0, asha_sweep, tmp_path)
    trial = fake_trial(config.trial_id, last_result={"status": "completed", "trial": config.trial_id})
    progress.on_trial_complete(0, [trial], trial)
    assert read_record(record_path(config, tmp_path, "cb")) is None  # no stopped record over the worker's
    assert not (tune_dir / "checkpoint_000003").exists()  # Tune's copy goes all the same
    assert lines() == []
    other = fake_trial("not-in-this-sweep", last_result={})
    progress.on_trial_complete(0, [other], other)  # another sweep's trial: nothing written, no error


def test_a_stopped_trial_ray_retried_keeps_each_step_once(tmp_path):
    """Review bug 9: a retried trial reports the steps after its checkpoint again, and the series
    rebuilt from Tune's result file repeated them."""
    reported = [{"step": s, "tokens": 64 * s, "lm": 9.0 - s} for s in (1, 2, 3)]
    retried = [{"step": s, "tokens": 64 * s, "lm": 8.5 - s} for s in (2, 3, 4)]  # resumed from step 1's checkpoint
    results = tmp_path / "result.json"
    results.write_text("\n".join(json.dumps(r) for r in reported + retried) + "\n{torn")
    config = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}})
    record = stopped_record(config, retried[-1], results)
    series = record["training"]["series"]
    assert [p["step"] for p in series] == [1, 2, 3, 4]
    assert series[1]["lm"] == 6.5  # the retry's report of step 2, the one training went on from
    assert record["status"] == "stopped" and record["stopped"]["tokens"] == 256


def test_rays_failure_traceback_goes_to_the_trial_log_not_the_console(tmp_path):
    folder = tmp_path / "records" / "1R4E2K-abc"
    moved = TrialErrorsToTrialLog({"1R4E2K-abc": folder})
    try:
        raise RuntimeError("The actor died unexpectedly before finishing this task.")
    except RuntimeError as error:
        exc_info = (type(error), error, error.__traceback__)
    make = logging.getLogger(moved.LOGGER).makeRecord
    failed = make(moved.LOGGER, logging.ERROR, __file__, 1, "Trial task failed for trial 1R4E2K-abc", (), exc_info)
    other = make(moved.LOGGER, logging.ERROR, __file__, 1, "Trial task failed for trial someone-else", (), None)
    assert moved.filter(failed) is False  # kept off the console
    assert moved.filter(other) is True  # not one of this sweep's trials: left alone
    log = (folder / "trial.log").read_text()
    assert "Trial task failed for trial 1R4E2K-abc" in log and "Traceback" in log and "actor died" in log


def test_loggers_follow_the_grids_tracking(monkeypatch):
    names = lambda out: [type(c).__name__ for c in out]  # noqa: E731
    assert names(loggers((), "s")) == ["JsonLoggerCallback", "CSVLoggerCallback"]
    assert names(loggers(("tensorboard",), "s"))[-1] == "TBXLoggerCallback"
