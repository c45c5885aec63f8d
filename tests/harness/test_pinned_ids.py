"""Trial ids are how completed records and shared dense baselines are found again: a change
to how configs are declared must leave every id as it was. data/pinned_ids.json holds the
ids of every trial of every shipped grid, and the configs and ids of real records written
by sweeps on this project's machine (three models, dense and factorized, older options at
their defaults), as computed before the config module was split by job."""

import json
from pathlib import Path

import pytest

from harness.config import TrialConfig
from harness.grid import load_grid

ROOT = Path(__file__).resolve().parents[2]
PINNED = json.loads((Path(__file__).parent / "data" / "pinned_ids.json").read_text())
GRIDS = sorted(k for k in PINNED if k.endswith(".yaml") and not k.startswith("trials/"))


@pytest.mark.parametrize("grid", GRIDS)
def test_every_shipped_grid_keeps_its_trial_ids(grid):
    sweep = load_grid(ROOT / "experiments" / grid, check_models=False)
    assert sorted(t.trial_id for t in sweep.trials) == sorted(PINNED[grid])  # the order of expansion may change


def test_the_shipped_trial_file_keeps_its_id():
    for name, ids in PINNED.items():
        if name.startswith("trials/"):
            assert [TrialConfig.from_yaml(ROOT / "experiments" / name).trial_id] == ids


def test_real_records_are_found_by_the_same_ids():
    assert len(PINNED["records"]) >= 5
    for config, trial_id in PINNED["records"]:
        assert TrialConfig.from_dict(config).trial_id == trial_id
