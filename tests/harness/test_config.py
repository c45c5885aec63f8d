from pathlib import Path

import pytest
from conftest import CALIBRATED

from harness.config import ConfigError, TrialConfig

TRIALS = sorted(Path(__file__).parents[2].joinpath("experiments", "trials").glob("*.yaml"))


@pytest.mark.parametrize("path", TRIALS, ids=[p.name for p in TRIALS])
def test_shipped_trial_yaml_validates(path):
    assert TrialConfig.from_yaml(path).trial_id


def test_every_problem_is_reported_with_field_and_value():
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_dict(
            {
                "modle": "x",
                "factor": {"n_experts": 4, "top_k": 5},
                "train": {"seq_len": "long"},
                "eval": {"tasks": ["squad"]},
                "latency": {"repeats": 0},
            }
        )
    problems = error.value.problems
    assert len(problems) == 5
    assert any(p.startswith("modle: unknown key; allowed: model,") for p in problems)
    assert "factor.top_k=5 must satisfy 1 <= top_k <= n_experts=4" in problems
    assert "train.seq_len: 'long' is not int" in problems
    assert any(p.startswith("eval.tasks='squad' is not a known benchmark") for p in problems)
    assert "latency.repeats: 0 must be >= 1" in problems


def test_trial_id_is_stable_and_content_derived():
    a = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}})
    b = TrialConfig.from_dict({"factor": {"top_k": 2, "n_experts": 4}, "device": "cpu"})
    c = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 1}})
    assert a.trial_id == b.trial_id != c.trial_id
    assert a.trial_id.startswith("1R4E2K-") and TrialConfig().trial_id.startswith("dense-")


def test_ids_are_pinned_and_the_default_dispatch_leaves_them_alone():
    """Completed records and shared dense baselines are found by id: the default
    dispatch, and any dispatch on a dense trial, must leave the id as it was. (The ids
    changed once on purpose, when eval.limit became a seeded sample and the held-out
    settings joined the eval section: records from before measured other items; and
    again when eval.lm joined it: records from before were scored by HFLM.)"""
    factored = {"factor": {"n_experts": 4, "top_k": 2}}
    assert TrialConfig().trial_id == "dense-ab3b5e75ac"
    assert TrialConfig.from_dict({"latency": {"dispatch": "reference"}}).trial_id == "dense-ab3b5e75ac"
    assert TrialConfig.from_dict(factored).trial_id == "1R4E2K-dd91613f35"
    assert TrialConfig.from_dict({**factored, "latency": {"dispatch": "auto"}}).trial_id == "1R4E2K-dd91613f35"
    assert TrialConfig.from_dict({**factored, "latency": {"dispatch": "reference"}}).trial_id != "1R4E2K-dd91613f35"


def test_latency_dispatch_must_name_a_path():
    with pytest.raises(
        ConfigError,
        match="latency.dispatch: 'fast' is not a dispatch path; allowed: auto, fused, grouped, reference, sorted",
    ):
        TrialConfig.from_dict({"latency": {"dispatch": "fast"}})


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        TrialConfig.from_yaml(path)


def test_heldout_text_must_not_be_the_training_corpus(tmp_path):
    with pytest.raises(ConfigError, match="eval.heldout_text: 'lee-news' is also train.corpus"):
        TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}, "train": {"corpus": "lee-news"}})
    text = tmp_path / "t.txt"
    text.write_text("words")
    with pytest.raises(ConfigError, match="is also train.corpus"):  # one file, two spellings
        TrialConfig.from_dict(
            {
                "factor": {"n_experts": 4, "top_k": 2},
                "train": {"corpus": str(text)},
                "eval": {"heldout_text": str(tmp_path / "." / "t.txt")},
            }
        )
    assert TrialConfig.from_dict({"train": {"corpus": "lee-news"}}).is_dense  # dense trials do not train


def test_heldout_sizes_are_checked():
    with pytest.raises(ConfigError, match=r"eval.heldout_tokens: 200 must hold at least 2 sequences"):
        TrialConfig.from_dict({"eval": {"heldout_tokens": 200, "heldout_seq_len": 128}})
    with pytest.raises(ConfigError, match=r"eval.heldout_seq_len: 1 must be >= 2"):
        TrialConfig.from_dict({"eval": {"heldout_seq_len": 1}})
    with pytest.raises(ConfigError, match=r"eval.heldout_documents: 1 must be 0 .* or >= 2"):
        TrialConfig.from_dict({"eval": {"heldout_documents": 1}})
    with pytest.raises(ConfigError, match=r"eval.heldout_documents: -3 must be >= 0"):
        TrialConfig.from_dict({"eval": {"heldout_documents": -3}})
    with pytest.raises(ConfigError, match=r"eval.heldout_documents: 200000 is above the limit of 100,000"):
        TrialConfig.from_dict({"eval": {"heldout_documents": 200_000}})


def test_held_out_documents_are_part_of_the_id_only_when_asked_for():
    assert TrialConfig.from_dict({"eval": {"heldout_documents": 0}}).trial_id == "dense-ab3b5e75ac"  # pinned
    assert TrialConfig.from_dict({"eval": {"heldout_documents": 64}}).trial_id != "dense-ab3b5e75ac"


def test_the_scoring_lm_is_checked_and_part_of_the_id():
    with pytest.raises(ConfigError, match=r"eval.lm: 'vllm' must be one of shared, hflm"):
        TrialConfig.from_dict({"eval": {"lm": "vllm"}})
    assert TrialConfig().eval.lm == "shared"
    assert TrialConfig.from_dict({"eval": {"lm": "hflm"}}).trial_id != TrialConfig().trial_id


def test_calibration_options_and_their_tokens_must_go_together():
    with pytest.raises(
        ConfigError,
        match=r"train.calibration_tokens: 0, but factor 1R3E1K1S .* needs a "
        r"calibration pass",
    ):
        TrialConfig.from_dict({"factor": CALIBRATED})
    with pytest.raises(ConfigError, match=r"train.calibration_tokens: 512, but factor 1R4E2K uses no calibrated"):
        TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}, "train": {"calibration_tokens": 512}})
    with pytest.raises(ConfigError, match=r"train.calibration_tokens: 30000 exceeds train.data_budget_tokens=20000"):
        TrialConfig.from_dict({"factor": CALIBRATED, "train": {"calibration_tokens": 30000}})
    with pytest.raises(ConfigError, match=r"train.layerwise_steps: 5 fits on the calibration inputs"):
        TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}, "train": {"layerwise_steps": 5}})
    with pytest.raises(ConfigError, match=r"lambda_lm and train.lambda_kd are both 0"):
        TrialConfig.from_dict({"train": {"lambda_lm": 0}})
    with pytest.raises(ConfigError, match=r"train.lambda_kd: -1 is outside \[0, 1000\]"):
        TrialConfig.from_dict({"train": {"lambda_kd": -1}})
    with pytest.raises(ConfigError, match=r"factor.router_init='fit' fits a router that router_mode='random' never"):
        TrialConfig.from_dict({"factor": {**CALIBRATED, "router_mode": "random"}, "train": {"calibration_tokens": 512}})


def test_recipe_options_change_the_id_and_the_label_but_defaults_do_not():
    base = TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}})
    explicit = TrialConfig.from_dict(
        {
            "factor": {"n_experts": 4, "top_k": 2, "n_shared": 0, "router_init": "random"},
            "train": {"calibration_tokens": 0, "lambda_kd": 0, "lambda_lm": 1},
        }
    )
    assert explicit.trial_id == base.trial_id == "1R4E2K-dd91613f35" and base.recipe == ""
    best = TrialConfig.from_dict({"factor": CALIBRATED, "train": {"calibration_tokens": 4096, "lambda_kd": 1}})
    assert best.trial_id.startswith("1R3E1K1S-") and best.factor.active_fraction == 0.5
    assert best.recipe == "mean_comp init=fit min_recon kd=1 cal=4096"
    assert best.label == "smollm2-135m 1R3E1K1S par coact mean_comp init=fit min_recon kd=1 cal=4096 20000tok"


def test_every_number_a_config_takes_declares_its_range():
    """Bounds sit beside each field's default (factorllm_core/options.py `setting`, `option`):
    a new numeric field without one fails here."""
    import typing
    from dataclasses import fields

    from factorllm_core import FactorConfig
    from factorllm_core.options import bound_of
    from harness.config import EvalConfig, FlopsConfig, LatencyConfig, TrainConfig
    from harness.grid import Failure, Resources, Scheduler

    missing = []
    for cls in (TrainConfig, EvalConfig, FlopsConfig, LatencyConfig, TrialConfig, Resources, Failure, Scheduler,
                FactorConfig):  # fmt: skip
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            if any(k in (int, float) for k in kinds) and f.name != "top_k" and bound_of(f) is None:
                missing.append(f"{cls.__name__}.{f.name}")  # top_k: bounded by n_experts, checked in FactorConfig
    assert missing == []


def test_how_often_state_is_saved_or_reported_is_no_factor_in_the_report():
    """Review: two trials differing only in checkpoint_every or churn_points were paired in the
    report as differing in "other training settings"."""
    base = {"factor": {"n_experts": 4, "top_k": 2}}
    a = TrialConfig.from_dict(base)
    saved = TrialConfig.from_dict({**base, "train": {"checkpoint_every": 5, "churn_points": 3}})
    reported = TrialConfig.from_dict({**base, "train": {"report_every": 7, "heldout_every": 2}})
    assert a.factors() == saved.factors() == reported.factors()
    assert saved.trial_id != a.trial_id  # in the id where they always were (ids are pinned)
    assert reported.trial_id == a.trial_id  # what is reported is not what is measured
    assert TrialConfig.from_dict({**base, "train": {"weight_decay": 0.1}}).factors() != a.factors()


def test_where_a_trial_runs_and_what_it_keeps_leave_its_id_alone():
    base = {"factor": {"n_experts": 4, "top_k": 2}}
    same = [{"device": "cpu"}, {"keep_checkpoints": True}, {"precision": "auto"}, {"dispatch": "auto"}]
    for extra in same:
        assert TrialConfig.from_dict({**base, **extra}).trial_id == TrialConfig.from_dict(base).trial_id
    assert TrialConfig.from_dict({**base, "precision": "bf16"}).trial_id != TrialConfig.from_dict(base).trial_id
    assert TrialConfig.from_dict({"dispatch": "sorted"}).trial_id == TrialConfig().trial_id  # no experts to dispatch


def test_keys_that_are_not_names_are_unknown_keys_not_a_traceback(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("1: 2\n~: 3\nmodel: smollm2-135m\n")
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_yaml(path)
    assert error.value.problems[0].startswith("1: unknown key; allowed: model, factor,")
    assert error.value.problems[1].startswith("None: unknown key")
