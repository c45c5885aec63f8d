"""Sweeps of tiny trials through Ray Tune (2 CPUs): results, a failing trial, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from harness.grid import load_grid
from harness.sweep import finish, run_sweep

WORDS = ("the a cat dog sat ran on in mat house big small red blue one two and or but so "
         "man woman is was he she it they").split()
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import conftest

    folder = tmp_path_factory.mktemp("assets")
    conftest.make_tiny("llama").save_pretrained(folder / "ckpt")
    conftest.make_word_tokenizer(WORDS).save_pretrained(folder / "ckpt")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(40)]
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    return folder


def write_grid(path: Path, assets: Path, storage: Path, budgets, repeats: int = 1) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "tiny", "storage": str(storage), "device": "cpu",
        "axes": {"model": [str(assets / "ckpt")], "n_experts": [4], "top_k": [2],
                 "data_budget_tokens": budgets},
        "train": {"corpus": str(assets / "corpus.txt"), "seq_len": 32, "batch_size": 2, "lr": 1e-3},
        "eval": {"tasks": ["arc_easy"], "limit": 1},
        "flops": {"seq_len": 32}, "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": repeats, "warmup": 0},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1}, "failure": {"max_failures": 0}}))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_sweep_records_a_failing_trial_beside_finishing_ones(assets, tmp_path, ray_cluster, cache_dir, capsys):
    # 5000 tokens exceed the tiny corpus: that trial must fail with the reason, the others finish
    grid = write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[200, 5000])
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


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(assets, tmp_path, cache_dir):
    grid = write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[100, 200, 300], repeats=150)
    command = [sys.executable, "-m", "harness.sweep", str(grid)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    records_dir = tmp_path / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not list(records_dir.glob("**/record.json")):
        time.sleep(1)
    first = {p: json.loads(p.read_text())["started_at"] for p in records_dir.glob("**/record.json")}
    assert first, "no trial finished in time"
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    output = process.communicate(timeout=180)[0].decode()
    assert process.returncode == 130, output
    assert "resume with  python -m harness.sweep" in output
    finished_before = len(first)
    assert finished_before < 4  # 3 variants + dense: something was left to do

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = {p: json.loads(p.read_text()) for p in records_dir.glob("**/record.json")}
    assert len(records) == 4 and all(r["status"] == "completed" for r in records.values())
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
