"""Sweeps of tiny trials through Ray Tune (2 CPUs): results, a failing trial, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import sweep_assets

from harness.grid import load_grid
from harness.sweep import finish, run_sweep

ROOT = Path(__file__).parents[2]


def test_sweep_records_a_failing_trial_beside_finishing_ones(assets, tmp_path, ray_cluster, cache_dir, capsys):
    # 5000 tokens exceed the tiny corpus: that trial must fail with the reason, the others finish
    grid = sweep_assets.write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[200, 5000])
    sweep, records = run_sweep(load_grid(grid), tmp_path / "runs")
    assert {t.precision for t in sweep.trials} == {"fp32"}  # fixed for the CPU workers, part of each id
    assert all(r["precision"] == "fp32" for r in records.values() if r["status"] == "completed")
    status = {tid: r["status"] for tid, r in records.items()}
    assert sorted(status.values()) == ["completed", "completed", "failed"]
    failed = next(r for r in records.values() if r["status"] == "failed")
    assert "data_budget_tokens=5000 exceeds corpus" in failed["error"] and "metrics" not in failed
    dense = next(t for t in sweep.trials if t.is_dense)
    assert records[dense.trial_id]["status"] == "completed"
    assert list((tmp_path / "runs" / "baselines").glob(f"*/{dense.trial_id}/record.json"))  # shared baseline
    assert finish(sweep, tmp_path / "runs", records, 1.0, str(grid)) == 1
    report = (tmp_path / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "exceeds corpus" in report and "## Main table" in report

    # A later dense baseline of another sweep with the same evaluation lands in the shared folder:
    # rebuilding this sweep's report must still give the sweep's own report, byte for byte.
    from reports.build import main as build_main

    dense_path = next((tmp_path / "runs" / "baselines").glob(f"*/{dense.trial_id}/record.json"))
    later = json.loads(dense_path.read_text()) | {"trial_id": "dense-later", "finished_at": "2999-01-01T00:00:00"}
    later["heldout"]["loss"] += 1.0
    (dense_path.parents[1] / "dense-later").mkdir()
    (dense_path.parents[1] / "dense-later" / "record.json").write_text(json.dumps(later))
    assert build_main([str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "rebuilt")]) == 0
    assert (tmp_path / "rebuilt" / "report.md").read_text() == report


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(assets, tmp_path, cache_dir):
    grid = sweep_assets.write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[100, 200], repeats=40)
    command = [sys.executable, "-m", "harness.sweep", str(grid)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    records_dir = tmp_path / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not list(records_dir.glob("**/record.json")):
        time.sleep(0.2)  # Ctrl-C right after the first record: two trials of 40 timed runs each are left
    first = {p: json.loads(p.read_text())["started_at"] for p in records_dir.glob("**/record.json")}
    assert first, "no trial finished in time"
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    output = process.communicate(timeout=180)[0].decode()
    assert process.returncode == 130, output
    assert "resume with  python -m harness.sweep" in output
    finished_before = len(first)
    assert finished_before < 3  # 2 variants + dense: something was left to do

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    counts = re.findall(r"\[sweep (\d+)/3,", resumed.stdout + resumed.stderr)
    assert counts and counts[-1] == "3", counts  # the count goes on from the restored trials, not from 1
    records = {p: json.loads(p.read_text()) for p in records_dir.glob("**/record.json")}
    assert len(records) == 3 and all(r["status"] == "completed" for r in records.values())
    for path, started in first.items():
        assert records[path]["started_at"] == started  # finished trials were not re-run


def test_precision_is_fixed_by_where_trials_run_and_keys_every_id():
    from harness.grid import expand_grid

    sweep = expand_grid({"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [1, 2]}})
    cpu, gpu = sweep.with_precision(on_gpu=False), sweep.with_precision(on_gpu=True)
    assert {t.precision for t in cpu.trials} == {"fp32"} and {t.precision for t in gpu.trials} == {"bf16"}
    # a CPU fp32 dense baseline can never be found (or reused) by a GPU bf16 sweep, nor a variant's record
    assert not {t.trial_id for t in cpu.trials} & {t.trial_id for t in gpu.trials}
    pinned = expand_grid({"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}, "device": "cpu"})
    assert {t.precision for t in pinned.with_precision(on_gpu=True).trials} == {"fp32"}  # a CPU trial stays fp32
