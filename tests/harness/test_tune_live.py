"""Ray Tune sees trials while they run: intermediate results in its result files and
TensorBoard events, early stopping by ASHA with stopped trials recorded as such, and the
scheduler's fields validated."""

import json
import struct
from pathlib import Path

import pytest
import sweep_assets
import yaml

from harness.grid import load_grid
from harness.sweep import finish, run_sweep


def grid(tmp_path: Path, assets: Path, **changes) -> Path:
    path = sweep_assets.write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[384])
    data = yaml.safe_load(path.read_text())
    data["train"] |= {"report_every": 1, "heldout_every": 2, "heldout_slice_tokens": 256}
    data["eval"] = {"benchmarks": False, "heldout_tokens": 512, "heldout_seq_len": 64}
    data["flops"] = {"enabled": False}
    data["latency"] = {"enabled": False}
    for key, value in changes.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalar tags and values of the TensorBoard event files under `folder` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_a_sweep_reports_intermediate_results_to_tune_and_tensorboard(assets, tmp_path, ray_cluster, cache_dir):
    path = grid(tmp_path, assets, keep_checkpoints=True)
    data = yaml.safe_load(path.read_text())
    data["train"]["checkpoint_every"] = 2
    path.write_text(yaml.safe_dump(data))
    sweep, records = run_sweep(load_grid(path), tmp_path / "runs")
    variant = next(t for t in sweep.trials if not t.is_dense)
    record = records[variant.trial_id]
    assert record["status"] == "completed"
    series = record["training"]["series"]  # 384 tokens at 64 a step: 6 steps, each reported
    assert [p["step"] for p in series] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in series if "heldout_loss" in p] == [2, 4, 6]  # every 2 steps, and the last
    assert all(p["tokens"] == 64 * p["step"] for p in series) and all(p["lr"] > 0 for p in series)

    trial_folder = tmp_path / "runs" / "tiny" / variant.trial_id  # Tune's own folder for the trial
    results = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
    intermediate = [r for r in results if "status" not in r]
    assert [r["tokens"] for r in intermediate] == [p["tokens"] for p in series]
    assert [r["heldout_loss"] for r in intermediate if "heldout_loss" in r] == [
        p["heldout_loss"] for p in series if "heldout_loss" in p
    ]
    assert results[-1]["status"] == "completed" and results[-1]["heldout_loss_full"] == record["heldout"]["loss"]

    # on one node Tune keeps no copy of the training state (it would double its disk): the trial's own is the one
    assert not list(trial_folder.glob("checkpoint_*"))
    assert (tmp_path / "runs" / "tiny" / "records" / variant.trial_id / "checkpoint" / "train_state.pt").exists()

    scalars = tensorboard_scalars(trial_folder)
    for tag in ("ray/tune/lm", "ray/tune/heldout_loss", "ray/tune/tokens", "ray/tune/lr", "ray/tune/tokens_per_s"):
        assert tag in scalars, sorted(scalars)
    expected = [p["heldout_loss"] for p in series if "heldout_loss" in p] + [record["heldout"]["loss"]]  # + final
    assert scalars["ray/tune/heldout_loss"] == pytest.approx(expected[:-1] + [series[-1]["heldout_loss"]], rel=1e-6)


def test_asha_stops_a_trial_and_its_record_and_report_say_so(assets, tmp_path, ray_cluster, cache_dir):
    path = grid(
        tmp_path,
        assets,
        scheduler={"type": "asha", "metric": "heldout_loss", "grace_tokens": 128, "reduction_factor": 2,
                   "max_tokens": 384},
    )  # fmt: skip
    data = yaml.safe_load(path.read_text())
    data["axes"] |= {"router_mode": ["par", "random"], "top_k": [1, 2, 3]}
    data["train"] |= {"heldout_every": 1, "checkpoint_every": 2}
    path.write_text(yaml.safe_dump(data))
    sweep, records = run_sweep(load_grid(path), tmp_path / "runs")
    stopped = [r for r in records.values() if r["status"] == "stopped"]
    completed = [r for r in records.values() if r["status"] == "completed" and r["config"].get("factor")]
    assert stopped and completed, {t: r["status"] for t, r in records.items()}
    for r in stopped:
        assert 128 <= r["stopped"]["tokens"] < 384 and r["training"]["tokens"] == r["stopped"]["tokens"]
        assert r["stopped"]["last"]["heldout_loss"] > 0 and r["training"]["series"]
        assert r["training"]["series"][-1]["tokens"] == r["stopped"]["tokens"]
        assert "metrics" not in r and "heldout" not in r  # no final measures: it never finished
    assert finish(sweep, tmp_path / "runs", records, 1.0, str(path)) == 0  # stopped is not failed
    report = (tmp_path / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "## Stopped early" in report
    failed_section = report.split("## Failed and missing trials")[1]
    assert not any(r["trial_id"] in failed_section for r in stopped)
    spent = sum(r["stopped"]["tokens"] for r in stopped) + 384 * len(completed)
    assert f"{spent:,} of the {384 * (len(stopped) + len(completed)):,}" in report
    best = min(completed, key=lambda r: r["heldout"]["loss"])
    assert f"Best completed trial by the full held-out loss: {best['trial_id']}" in report
    assert (tmp_path / "runs" / "tiny" / "report" / "heldout_during_training.png").exists()
    # without keep_checkpoints, no training state stays behind: neither Tune's copies nor the trials' own
    assert not list((tmp_path / "runs" / "tiny").glob("*/checkpoint_*"))
    assert not list((tmp_path / "runs" / "tiny" / "records").glob("*/checkpoint"))


def test_a_trial_without_its_checkpoint_folder_resumes_from_tunes_copy(tmp_path):
    from ray.tune import Checkpoint

    from harness.tune.worker import restore_checkpoint

    tune_copy = tmp_path / "tune"
    tune_copy.mkdir()
    (tune_copy / "train_state.pt").write_bytes(b"state at step 4")
    local = tmp_path / "records" / "1R4E2K-x" / "checkpoint"
    restore_checkpoint(Checkpoint.from_directory(str(tune_copy)), local)
    assert (local / "train_state.pt").read_bytes() == b"state at step 4"
    (local / "train_state.pt").write_bytes(b"newer local state")
    restore_checkpoint(Checkpoint.from_directory(str(tune_copy)), local)  # the trial's own folder wins
    assert (local / "train_state.pt").read_bytes() == b"newer local state"
    restore_checkpoint(None, tmp_path / "other")  # a first attempt: nothing to restore
    assert not (tmp_path / "other").exists()


def test_tune_copies_training_checkpoints_only_across_several_nodes():
    from harness.tune.cluster import tune_keeps_checkpoints

    assert not tune_keeps_checkpoints([{"Alive": True}])
    assert not tune_keeps_checkpoints([{"Alive": True}, {"Alive": False}])  # a dead node holds nothing
    assert tune_keeps_checkpoints([{"Alive": True}, {"Alive": True}])
