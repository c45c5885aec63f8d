"""A sweep on a two-node Ray cluster (two raylets on this machine), and an unreachable one.
(Its own module: test_sweep.py keeps a local Ray running for its module, which a
cluster driver must not find.)"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sweep_assets
import yaml

ROOT = Path(__file__).parents[2]


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray head and one worker node: two separate raylets on this machine (1 CPU each).
    Ray's own switch for clusters on a laptop (off) makes every node, and the sweep's
    driver, bind to 127.0.0.1: nothing leaves the machine."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # for the processes started below
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this process read it at import

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_a_sweep_on_a_two_node_cluster_runs_trials_on_both_nodes(assets, tmp_path, two_node_cluster, cache_dir):
    grid = sweep_assets.write_grid(tmp_path / "grid.yaml", assets, tmp_path / "runs", budgets=[100, 200, 300])
    text = yaml.safe_load(grid.read_text())
    text["resources"]["max_concurrent_trials"] = 2  # one trial per node at a time (1 CPU each)
    grid.write_text(yaml.safe_dump(text))
    result = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(grid), "--address", two_node_cluster.address],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/record.json")]
    assert len(records) == 4 and all(r["status"] == "completed" for r in records)
    nodes = {r["environment"]["ray_node_id"] for r in records}
    assert len(nodes) == 2  # both nodes ran trials, and each record says which
    assert {r["environment"]["ray_node_ip"] for r in records} == {"127.0.0.1"}


def test_an_unreachable_cluster_is_one_line_saying_what_to_check(tmp_path, capsys):
    from harness.sweep import main

    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: t\nstorage: {tmp_path}\naxes: {{model: [smollm2-135m], n_experts: [4], top_k: [2]}}\n")
    start = time.perf_counter()
    assert main([str(grid), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not join the Ray cluster at '127.0.0.1:1'") and "RAY_AUTH_MODE" in err
    assert time.perf_counter() - start < 30
