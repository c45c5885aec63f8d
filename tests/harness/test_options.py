"""A recipe option declared once, on its config field, is everywhere it must be: a grid axis
with its type, the recipe string, the paper-recipe test, the trial-id rule, the report's
factors and validation. The dummy option below is added in one place only."""

from dataclasses import dataclass

import pytest

from factorllm_core import FactorConfig
from factorllm_core.options import option
from harness import config as config_module
from harness.config import ConfigError, TrialConfig, axis_options
from harness.grid import expand_grid


@dataclass(frozen=True)
class WithWobble(FactorConfig):
    wobble: int = option(0, recipe=True, tag="wobble={}", added_later=True)  # the one place


@pytest.fixture
def wobble(monkeypatch):
    monkeypatch.setitem(config_module.OPTION_CLASSES, "factor", WithWobble)


def grid(values):
    return {
        "axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2], "wobble": values},
        "dense_baseline": False,
    }


def test_a_new_option_becomes_an_axis_of_its_type(wobble):
    assert axis_options()["wobble"].type is int and axis_options()["wobble"].path == ("factor", "wobble")
    sweep = expand_grid(grid([0, 3]), check_models=False)
    assert [t.factor.wobble for t in sweep.trials] == [0, 3]


def test_a_new_option_shows_in_the_recipe_and_the_paper_test(wobble):
    paper, changed = expand_grid(grid([0, 3]), check_models=False).trials
    assert (paper.recipe, changed.recipe) == ("", "wobble=3")
    assert paper.paper_recipe and not changed.paper_recipe
    assert "wobble=3" in changed.label


def test_a_new_option_at_its_paper_value_keeps_older_trial_ids(wobble, monkeypatch):
    paper = expand_grid(grid([0]), check_models=False).trials[0].trial_id
    monkeypatch.setitem(config_module.OPTION_CLASSES, "factor", FactorConfig)
    before = expand_grid(
        {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}, "dense_baseline": False},
        check_models=False,
    ).trials[0]
    assert paper == before.trial_id


def test_a_new_option_is_a_factor_of_the_report(wobble):
    paper, changed = expand_grid(grid([0, 3]), check_models=False).trials
    a, b = paper.describe()["factors"], changed.describe()["factors"]
    assert [k for k in a if a[k] != b[k]] == ["wobble"]  # the pair differs in exactly this factor


def test_a_new_option_is_validated(wobble):
    with pytest.raises(ConfigError, match=r"axes.wobble: 'x' is not an integer"):
        expand_grid(grid(["x"]), check_models=False)
    with pytest.raises(ConfigError, match=r"factor.wobble='x' must be an integer"):
        TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2, "wobble": "x"}})
    with pytest.raises(ValueError, match=r"wobble=True must be an integer"):
        WithWobble(n_experts=4, top_k=2, wobble=True)


def test_recipe_options_declare_the_paper_recipe():
    """The declarations reproduce the paper's recipe and the shipped recipe strings."""
    paper = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}})
    assert paper.paper_recipe and paper.recipe == ""
    best = TrialConfig.from_dict(
        {
            "factor": {
                "n_experts": 3,
                "top_k": 1,
                "n_shared": 1,
                "partition": "coact",
                "combine": "unscaled",
                "router_init": "fit",
                "pseudo_label": "min_recon",
            },
            "train": {"calibration_tokens": 4096, "lambda_kd": 1.0, "lambda_lm": 0.5},
        }
    )
    assert best.recipe == "unscaled init=fit min_recon kd=1 lm=0.5 cal=4096" and not best.paper_recipe
    coact_only = TrialConfig.from_dict(
        {"factor": {"n_experts": 4, "top_k": 2, "partition": "coact"}, "train": {"calibration_tokens": 512}}
    )
    assert coact_only.recipe == "cal=512" and not coact_only.paper_recipe  # the partition shows in the label
    assert "coact" in coact_only.label
