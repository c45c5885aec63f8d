"""Fixtures shared by the tests that run tiny sweeps through Ray Tune."""

import os

import pytest
import sweep_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return sweep_assets.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
