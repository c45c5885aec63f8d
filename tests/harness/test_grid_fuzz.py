"""Grid validation is total: every input gets exit 0 or exit 2 with a message, never a
traceback or a hang. Known bad inputs first, then seeded mutations of the shipped grids."""

import math
import random
import time
from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError
from harness.grid import load_grid
from harness.sweep import main as sweep_main

GRIDS = sorted(Path(__file__).parents[2].joinpath("experiments").glob("*.yaml"))
DEFAULT = Path(__file__).parents[2] / "experiments" / "grid.yaml"


def write(tmp_path, data, name="g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def default(**changes):
    data = yaml.safe_load(DEFAULT.read_text())
    for dotted, value in changes.items():
        target, *parents, leaf = [data] + dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return data


BAD = {  # each was accepted silently or gave a traceback before
    "name path": (default(name="../../etc/evil"), "name: '../../etc/evil' must be a plain name"),
    "name empty": (default(name=""), "name: '' must be a plain name"),
    "name baselines": (default(name="baselines"), "not baselines"),
    "storage list": (default(storage=["a", "b"]), "storage: ['a', 'b'] must be a folder path"),
    "dense_baseline string": (default(dense_baseline="no"), "dense_baseline: 'no' must be true or false"),
    "device tpu": (default(device="tpu"), "device: 'tpu' is not a device"),
    "gpus nan": (default(**{"resources.gpus_per_trial": math.nan}), "resources.gpus_per_trial: nan is not"),
    "gpus inf": (default(**{"resources.gpus_per_trial": math.inf}), "resources.gpus_per_trial: inf is not"),
    "routers huge": (
        default(**{"axes.n_routers": [10**30]}),
        "factor.n_routers=1000000000000000000000000000000 must be in [1, 64]",
    ),
    "routers float": (default(**{"axes.n_routers": [1e30]}), "axes.n_routers: 1e+30 is not an integer"),
    "routers many": (default(**{"axes.n_routers": [65]}), "n_routers=65 must be in [1, 64]"),
    "tasks empty": (default(**{"eval.tasks": []}), "eval.tasks: () names no benchmark"),
    "top_k strings": (default(**{"axes.top_k": ["1", 2]}), "axes.top_k: '1' is not an integer"),
    "n_experts null": (default(**{"axes.n_experts": [None]}), "axes.n_experts: None is not an integer"),
    "model number": (default(**{"axes.model": [123]}), "axes.model: 123 is not a string"),
    "empty axis with include": (default(**{"axes.top_k": []}), "axes.top_k: empty list"),
    "lr nan": (default(**{"train.lr": math.nan}), "train.lr: nan is not a finite float"),
    "train list": (default(train=[1, 2]), "train: [1, 2] must be a mapping"),
    "corpus empty": (default(**{"train.corpus": ""}), "train.corpus: corpus='' is empty"),
    "factor list": (default(factor=[1]), "factor: [1] must be a mapping"),
    "lr nan in a list": (default(**{"train.betas": [0.9, math.nan]}), "train.betas: [0.9, nan] is not"),
    "include scalar": (default(include=3), "include: 3 must be a list"),
    "skip dict value": (default(skip=[{"when": {"top_k": {"a": 1}}, "reason": "x"}]), "skip[0].when: values must be"),
    "seed negative": (default(**{"axes.seed": [-1]}), "seed: -1 must be in [0, 2**31)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grids_exit_2_with_the_field_named(case, tmp_path, capsys):
    data, message = BAD[case]
    assert sweep_main([str(write(tmp_path, data)), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_duplicate_keys_are_refused(tmp_path):
    text = DEFAULT.read_text().replace("name: default\n", "name: default\nname: other\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_grid(write(tmp_path, text))


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    lines += ["axes: {model: *a8, n_experts: [4], top_k: [1]}"]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_grid(write(tmp_path, "\n".join(lines)))
    assert time.perf_counter() - start < 5


REPLACEMENTS = [
    None,
    "",
    "x",
    "../x",
    "all",
    "cpu",
    -1,
    0,
    1,
    2,
    3,
    7,
    10**30,
    0.5,
    1e30,
    math.nan,
    math.inf,
    True,
    False,
    [],
    {},
    [None],
    ["1", 2],
    [[1]],
    {"a": 1},
    {"model": "x"},
]


def _slots(node, path=()):
    """Every (container, key) in the tree, for mutation."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield node, key, path + (key,)
        yield from _slots(value, path + (key,))


def mutate(data, rng: random.Random) -> str:
    slots = list(_slots(data))
    container, key, path = rng.choice(slots)
    action = rng.choice(["replace", "replace", "replace", "delete", "wrap", "unknown"])
    if action == "replace":
        container[key] = rng.choice(REPLACEMENTS)
    elif action == "delete":
        container.pop(key) if isinstance(container, dict) else container.pop(key)
    elif action == "wrap":
        container[key] = [container[key]]
    elif isinstance(container, dict):
        container[f"extra_{rng.randint(0, 9)}"] = rng.choice(REPLACEMENTS)
    return f"{action} at {path}"


@pytest.mark.parametrize("seed", range(12))
def test_mutated_shipped_grids_exit_0_or_2_never_a_traceback(seed, tmp_path, capsys):
    """12 x 30 = 360 seeded mutations of the shipped grids (one to three edits each)."""
    rng = random.Random(seed)
    for i in range(30):
        source = rng.choice(GRIDS)
        data = yaml.safe_load(source.read_text())
        edits = [mutate(data, rng) for _ in range(rng.randint(1, 3))]
        path = write(tmp_path, data, f"m{i}.yaml")
        start = time.perf_counter()
        try:
            code = sweep_main([str(path), "--dry-run"])
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{source.name} {edits}: {type(error).__name__}: {error}")
        captured = capsys.readouterr()
        assert code in (0, 2), (source.name, edits, code)
        if code == 2:
            assert captured.err.startswith("error: "), (source.name, edits)
            assert max(len(line) for line in captured.err.splitlines()) < 2000  # values are cut short
        assert time.perf_counter() - start < 10, (source.name, edits)
