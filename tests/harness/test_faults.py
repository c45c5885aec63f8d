"""Faults: corrupt records, failed writes, a second sweep on the same storage, a damaged
Ray state on --resume, retries. Each becomes a clear outcome, never a bare traceback."""

import errno
import fcntl
import json
from types import SimpleNamespace

import pytest

from harness import sweep as sweep_module
from harness.config import TrialConfig
from harness.trial import existing_record
from harness.tune.worker import trial_dir, tune_metrics
from reports.record import new_record, read_record, write_json_atomic


def test_a_corrupt_record_is_named_and_treated_as_missing(tmp_path, caplog):
    config = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}})
    path = tmp_path / config.trial_id / "record.json"
    path.parent.mkdir()
    path.write_text('{"status": "compl')  # a torn write
    assert existing_record(config, tmp_path) is None  # the trial runs again
    assert str(path) in caplog.text and "treated as missing" in caplog.text
    record = new_record(config.describe(), status="completed")
    path.write_text(json.dumps(record))
    assert existing_record(config, tmp_path)["status"] == "completed"
    path.write_text("[1, 2]")
    assert read_record(path) is None
    caplog.clear()
    path.write_text(json.dumps(record | {"schema": 2}))  # written by an older harness: read the same way everywhere
    assert read_record(path) is None and existing_record(config, tmp_path) is None
    assert "schema 2, this harness reads schema 3" in caplog.text
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "config"}))
    assert read_record(path) is None and "missing field(s) config" in caplog.text


def test_collect_records_treats_a_corrupt_record_as_unfinished(tmp_path):
    from harness.grid import expand_grid

    sweep = expand_grid(
        {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}, "dense_baseline": False, "name": "s"}
    )
    (trial,) = sweep.trials
    path = trial_dir(trial, tmp_path, "s") / trial.trial_id / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert sweep_module.collect_records(sweep, tmp_path) == {trial.trial_id: None}


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_record(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"status": "completed"})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"status": "failed"})
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert json.loads(path.read_text()) == {"status": "completed"}


def test_a_failed_checkpoint_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import torch

    from harness import train

    monkeypatch.setattr(
        torch,
        "save",
        lambda state, path: (
            open(path, "wb").write(b"torn"),
            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
        ),
    )
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(OSError, match="No space left"):
        train._save_state(model, optimizer, scheduler, train.TrainSummary(), tmp_path / "train_state.pt", None)
    assert list(tmp_path.iterdir()) == []


def test_torchs_full_disk_error_is_named_as_one(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as 'unexpected pos ...' (seen on a 250 KiB tmpfs)."""
    import shutil
    from collections import namedtuple

    import torch

    from harness import train

    def torn(state, path):
        open(path, "wb").write(b"torn")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 158528 vs 158420")

    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(250 << 10, 250 << 10, 0))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(OSError, match=r"could not write the training checkpoint .* \(0 KiB free") as error:
        train._save_state(model, optimizer, scheduler, train.TrainSummary(), tmp_path / "train_state.pt", None)
    assert error.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: torch's error, unchanged
        train._save_state(model, optimizer, scheduler, train.TrainSummary(), tmp_path / "train_state.pt", None)


def test_a_failed_trial_shows_its_reason_in_the_progress_line():
    result = tune_metrics({"status": "failed", "trial_id": "x", "error": "OSError: [Errno 28] " + "y" * 500})
    assert result["error"].startswith("OSError: [Errno 28] yyy") and len(result["error"]) == 200


def test_a_second_sweep_on_the_same_storage_and_name_is_refused(tmp_path):
    with sweep_module.sweep_lock(tmp_path, "default"):
        with pytest.raises(sweep_module.SweepRunning, match=r"sweep 'default' is already running on .* \(pid \d+ on "):
            with sweep_module.sweep_lock(tmp_path, "default"):
                pass
        with sweep_module.sweep_lock(tmp_path, "other"):  # another name is another sweep
            pass
    with sweep_module.sweep_lock(tmp_path, "default"):  # released after the first one ends
        pass


def test_the_sweep_command_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: locked\nstorage: {tmp_path}\naxes: {{model: [smollm2-135m], n_experts: [4], top_k: [2]}}\n")
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: pytest.fail("ran while locked"))
    lock = tmp_path / "locked" / ".sweep.lock"
    lock.parent.mkdir()
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("pid 12345 on elsewhere")
        handle.flush()
        assert sweep_module.main([str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep 'locked' is already running") and "pid 12345 on elsewhere" in err


def test_ray_failing_on_a_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    def fit():
        raise EOFError("Ran out of input")  # what Ray raised reading its truncated state on a 2 MB tmpfs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2 << 20, (2 << 20) - 4096, 4096))
    with pytest.raises(OSError, match=r"Ray stopped \(EOFError: Ran out of input\) with 4 KiB free") as error:
        sweep_module.fit(SimpleNamespace(fit=fit), tmp_path)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))  # plenty of space:
    with pytest.raises(EOFError):  # Ray's own error, unchanged
        sweep_module.fit(SimpleNamespace(fit=fit), tmp_path)


def test_a_damaged_ray_state_on_resume_says_what_to_do(tmp_path, capsys, monkeypatch):
    def restore(path, trainable, resume_errored):
        raise KeyError("params")  # what Ray's trial name creators raised on a truncated state

    fake_tune = SimpleNamespace(Tuner=SimpleNamespace(restore=restore))
    with pytest.raises(sweep_module.DamagedState) as error:
        sweep_module.restore_tuner(fake_tune, tmp_path / "broken", trainable=None)
    assert "cannot be restored (KeyError: 'params')" in str(error.value) and "without --resume" in str(error.value)

    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: broken\nstorage: {tmp_path}\naxes: {{model: [smollm2-135m], n_experts: [4], top_k: [2]}}\n")
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: (_ for _ in ()).throw(error.value))
    assert sweep_module.main([str(grid), "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: Ray's experiment state in")


def test_a_full_disk_during_the_sweep_is_one_line(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: full\nstorage: {tmp_path}\naxes: {{model: [smollm2-135m], n_experts: [4], top_k: [2]}}\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sweep_module, "run_sweep", full)
    assert sweep_module.main([str(grid)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "records already written are kept" in err[0]


def test_ray_stopping_the_sweep_on_memory_is_one_line_not_a_traceback(tmp_path):
    """Tune 2.60 raises from fit() when its memory monitor kills a worker (measured: a Gemma3-270M
    trial with distillation at 20 GB on this 24 GB machine); the sweep keeps its records and says why."""
    from harness.sweep import RayStopped, fit

    class Tuner:
        def fit(self):
            raise RuntimeError(
                "Caught unexpected exception: 1 worker(s) were killed due to the node running low on memory. "
                "Memory on the node (IP: 192.0.2.2, ID: 4c88) was 22.51GB used / 23.54GB limit (0.956301)\n"
                "OOM kill reason: Memory usage 24044290048B exceeded threshold of 24012267520B\n"
                "Object store memory usage: [- objects spillable: 4\n- bytes spillable: 94"
            )

    with pytest.raises(RayStopped) as stopped:
        fit(Tuner(), tmp_path)
    message = str(stopped.value)
    assert "\n" not in message and "running low on memory" in message and "22.51GB used / 23.54GB" in message
    assert "Object store" not in message


def test_a_restored_tuner_gets_this_processes_callbacks(tmp_path):
    """Review bug 8: Tune restores the callbacks the dead process pickled (its clock, its storage);
    the sweep replaces them on the restored tuner. Checked on a real Tuner of this Ray version."""
    tune = pytest.importorskip("ray.tune")
    from harness.sweep import use_callbacks
    from harness.tune.callbacks import Progress

    old, new = Progress(total=1), Progress(total=1)
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[old]))
    use_callbacks(tuner, [new])
    assert tuner._local_tuner.get_run_config().callbacks == [new]
    with pytest.raises(sweep_module.DamagedState, match="run without --resume"):
        use_callbacks(SimpleNamespace(), [new])
