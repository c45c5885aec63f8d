"""Grid validation is total: every input gets exit 0 or exit 2 with a message, never a
traceback or a hang. Known bad inputs first, then seeded mutations of the shipped grids."""

import json
import math
import os
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
        "factor.n_routers: 1e+30 is above the limit of 64 routers per layer",
    ),
    "routers float": (default(**{"axes.n_routers": [1e30]}), "axes.n_routers: 1e+30 is not an integer"),
    "routers many": (
        default(**{"axes.n_routers": [65]}),
        "factor.n_routers: 65 is above the limit of 64",
    ),
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
    "seed negative": (default(**{"axes.seed": [-1]}), "seed: -1 is outside [0, 2147483647] (a seed)"),
}


SCHEDULER = {  # the early-stopping and tracking sections (issue 25)
    "type": (default(scheduler={"type": "hyperband"}), "scheduler.type: 'hyperband' must be one of none, asha"),
    "metric": (default(scheduler={"type": "asha", "metric": "acc"}), "scheduler.metric: 'acc' must be one of"),
    "mode": (default(scheduler={"type": "asha", "mode": "up"}), "scheduler.mode: 'up' must be min or max"),
    "grace": (default(scheduler={"type": "asha", "grace_tokens": 0}), "scheduler.grace_tokens: 0 must be >= 1"),
    "factor": (
        default(scheduler={"type": "asha", "reduction_factor": 1}),
        "reduction_factor: 1 must be >= 2",
    ),
    "max": (
        default(scheduler={"type": "asha", "grace_tokens": 1000, "max_tokens": 10}),
        "scheduler.max_tokens: 10 must be >= grace_tokens=1000",
    ),
    "unknown key": (default(scheduler={"type": "asha", "patience": 3}), "scheduler.patience: unknown key"),
    "not a mapping": (default(scheduler="asha"), "scheduler: 'asha' must be a mapping"),
    "string tokens": (default(scheduler={"type": "asha", "grace_tokens": "4k"}), "scheduler.grace_tokens: '4k' is"),
    "no held-out loss": (
        default(scheduler={"type": "asha"}, **{"train.heldout_every": 0}),
        "scheduler.metric: heldout_loss needs train.heldout_every > 0",
    ),
    "tracking": (default(tracking="wandb"), "tracking: 'wandb' is not a tracker"),
}
BAD |= {f"scheduler {case}": value for case, value in SCHEDULER.items()}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grids_exit_2_with_the_field_named(case, tmp_path, capsys):
    data, message = BAD[case]
    assert sweep_main([str(write(tmp_path, data)), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_duplicate_keys_are_refused(tmp_path):
    text = DEFAULT.read_text().replace("name: default\n", "name: default\nname: other\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_grid(write(tmp_path, text))


def test_merge_keys_merge_and_the_mapping_own_keys_override(tmp_path):
    text = (
        "axes: {model: [smollm2-135m], n_experts: [4], top_k: [2]}\n"
        "include:\n  - &base {n_experts: 3, top_k: 1, combine: unscaled, seed: 4}\n"
        "  - {<<: *base, top_k: 2, n_experts: 6}\n"
    )
    trials = load_grid(write(tmp_path, text)).trials
    assert [(t.factor.name, t.factor.combine, t.seed) for t in trials if t.factor] == [
        ("1R4E2K", "scaled", 0), ("1R3E1K", "unscaled", 4), ("1R6E2K", "unscaled", 4)]  # fmt: skip
    with pytest.raises(ConfigError, match="duplicate key 'top_k'"):  # still refused within one mapping
        load_grid(write(tmp_path, text.replace("top_k: 2, n_experts: 6", "top_k: 2, top_k: 3")))


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


# Structure-level inputs (second pass): each class was a traceback, a hang, a silent default
# or a silent wrong acceptance before. The grid is refused in one message naming the field.
PATH_FIELDS = ("storage", "train.corpus", "eval.heldout_text", "axes.model")
SECTIONS = ("train", "eval", "flops", "latency", "factor", "resources", "failure")
STRUCTURE = {
    **{
        f"{section} {value!r}": (default(**{section: value}), f"{section}: {value!r} must be a mapping")
        for section in SECTIONS
        for value in (0, False, "", [])
    },
    **{
        f"{field} with {char!r}": (
            default(**{field: [f"runs{char}x"] if field == "axes.model" else f"runs{char}x"}),
            "control character",
        )
        for field in PATH_FIELDS
        for char in ("\0", "\n", "\x1b")
    },
    "include negative n_experts": (default(include=[{"n_experts": -1, "top_k": 1}]), "factor.n_experts"),
    "skip empty when": (default(skip=[{"when": {}, "reason": "x"}]), "skip[0].when: {} must map at least one axis"),
    "skip null reason": (default(skip=[{"when": {"top_k": 1}, "reason": None}]), "skip[0].reason: None must be"),
    "skip number reason": (default(skip=[{"when": {"top_k": 1}, "reason": 3}]), "skip[0].reason: 3 must be"),
    "skip unknown key": (
        default(skip=[{"when": {"top_k": 1}, "reason": "x", "unless": 1}]),
        "skip[0]: unknown key 'unless'",
    ),
    "skip wrong type": (default(skip=[{"when": {"top_k": "1"}, "reason": "x"}]), "skip[0].when.top_k: '1' is not"),
    "skip everything": (
        default(skip=[{"when": {"model": ["smollm2-135m"]}, "reason": "x"}]),
        "the rules skip all 4 factorized combinations",
    ),
    **{
        f"{field} too large": (default(**{field: 0x7FFFFFFF}), f"{field}: 2147483647 is above the limit")
        for field in ("flops.seq_len", "train.seq_len", "train.batch_size", "latency.decode_tokens", "eval.limit")
    },
}


@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_structure_level_mistakes_exit_2_naming_the_field(case, tmp_path, capsys):
    data, message = STRUCTURE[case]
    start = time.perf_counter()
    assert sweep_main([str(write(tmp_path, data)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.perf_counter() - start < 10


def test_a_negative_n_experts_in_include_is_invalid_not_skipped(tmp_path, capsys):
    assert sweep_main([str(write(tmp_path, default(include=[{"n_experts": -1, "top_k": 1}]))), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "n_experts" in err and "skipped" not in err and "top_k > n_experts" not in err


def test_a_null_section_is_an_empty_one(tmp_path):
    """`flops:` with everything under it commented out is YAML null: the defaults, as if absent."""
    data = default()
    data.pop("flops", None)
    with_null = default(flops=None)
    assert {t.trial_id for t in load_grid(write(tmp_path, with_null, "a.yaml")).trials} == {
        t.trial_id for t in load_grid(write(tmp_path, data, "b.yaml")).trials
    }


@pytest.mark.parametrize("field", ["train.corpus", "eval.heldout_text"])
@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_are_not_read_as_text(field, special, tmp_path, capsys):
    if special == "fifo":
        special = str(tmp_path / "pipe.txt")
        os.mkfifo(special)  # opening it would block until a writer came
    start = time.perf_counter()
    assert sweep_main([str(write(tmp_path, default(**{field: special}))), "--dry-run"]) == 2
    assert "is not a regular file or folder" in capsys.readouterr().err
    assert time.perf_counter() - start < 10


def test_a_binary_corpus_is_named_at_validation(tmp_path, capsys):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    assert sweep_main([str(write(tmp_path, default(**{"train.corpus": str(binary)}))), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{binary} is not UTF-8 text" in err


def _nested(depth: int) -> str:
    return "name: deep\naxes: " + "{a: " * depth + "1" + "}" * depth + "\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (_nested(5000), "nested more than 32 levels deep"),
        ("name: deep\naxes:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)), "nested more than"),
        ("x: [" + "[" * 10000 + "]" * 10000 + "]", "nested more than"),
    ],
    ids=["flow mappings", "block mappings", "flow lists"],
)
def test_deep_nesting_is_refused_while_parsing(text, message, tmp_path, capsys):
    start = time.perf_counter()
    assert sweep_main([str(write(tmp_path, text)), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_a_huge_grid_is_refused_before_it_is_parsed(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("name: big\naxes: {model: [smollm2-135m], n_experts: [4], top_k: [1]}\n" + "# x\n" * 5_000_000)
    start = time.perf_counter()
    assert sweep_main([str(path), "--dry-run"]) == 2
    assert "larger than 1 MB" in capsys.readouterr().err
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("target", ["/dev/zero", "folder", "binary", "missing"])
def test_the_grid_file_itself_must_be_a_regular_text_file(target, tmp_path, capsys):
    path = {"folder": tmp_path, "missing": tmp_path / "nope.yaml", "/dev/zero": Path("/dev/zero")}.get(target)
    if target == "binary":
        path = tmp_path / "g.yaml"
        path.write_bytes(b"name: x\n\xff\xfe\x00")
    assert sweep_main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) <= 3, err


# Generators for the structure-level fuzz: each returns grid text or data from a seeded rng.
def _deep(rng):
    return _nested(rng.choice([31, 33, 200, 3000]))


def _big(rng):
    return yaml.safe_dump(default()) + "# padding\n" * rng.choice([10, 200_000])


def _special(rng):
    field = rng.choice(["train.corpus", "eval.heldout_text", "storage"])
    return default(**{field: rng.choice(["/dev/zero", "/dev/null", "/dev/urandom", "/proc/self/mem", "/"])})


def _control(rng):
    field = rng.choice(PATH_FIELDS + ("name",))
    char = chr(rng.choice([0, 1, 9, 10, 13, 27, 127]))
    value = f"a{char}b"
    return default(**{field: [value] if field == "axes.model" else value})


def _falsy(rng):
    return default(**{rng.choice(SECTIONS): rng.choice([0, False, "", [], None])})


def _bad_include(rng):
    axis = rng.choice(["n_experts", "top_k", "n_routers", "seed", "model", "nope"])
    return default(include=[{axis: rng.choice([-1, 0, 10**6, "x", None, [1], {"a": 1}, 1.5, True])}])


def _bad_skip(rng):
    rule = {"when": rng.choice([{}, {"top_k": rng.choice([1, "1", [1, "x"], None, [], {"a": 1}])}, None, []])}
    rule |= rng.choice([{"reason": rng.choice(["why", None, 3, "", []])}, {}, {"reason": "x", "extra": 1}])
    return default(skip=rng.choice([[rule], rule, [rule, rule]]))


def _huge_number(rng):
    field = rng.choice(["flops.seq_len", "train.seq_len", "eval.heldout_tokens", "latency.prefill_len"])
    return default(**{field: rng.choice([0x7FFFFFFF, 2**40, 10**12, -(2**31)])})


GENERATORS = [_deep, _big, _special, _control, _falsy, _bad_include, _bad_skip, _huge_number]


@pytest.mark.parametrize("seed", range(4))
def test_structure_fuzz_exits_0_or_2_within_a_time_bound(seed, tmp_path, capsys):
    """4 x 16 seeded grids from the structure-level generators, one to three at once."""
    rng = random.Random(1000 + seed)
    for i in range(16):
        made = [rng.choice(GENERATORS) for _ in range(rng.randint(1, 3))]
        produced = [g(rng) for g in made]
        data = next((p for p in produced if isinstance(p, str)), None)
        if data is None:  # merge the data-level edits into one grid
            data = default()
            for p in produced:
                data.update({k: v for k, v in p.items() if v != default().get(k)})
        path = write(tmp_path, data, f"s{i}.yaml")
        start = time.perf_counter()
        try:
            code = sweep_main([str(path), "--dry-run"])
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{[g.__name__ for g in made]}: {type(error).__name__}: {error}")
        captured = capsys.readouterr()
        assert code in (0, 2), ([g.__name__ for g in made], code)
        if code == 2:
            assert captured.err.startswith("error: ")
        assert time.perf_counter() - start < 10, [g.__name__ for g in made]


def test_a_valid_scheduler_leaves_the_trial_ids_alone(tmp_path):
    plain = load_grid(write(tmp_path, default(), "a.yaml"))
    asha = load_grid(write(tmp_path, default(scheduler={"type": "asha", "grace_tokens": 4096}), "b.yaml"))
    assert [t.trial_id for t in plain.trials] == [t.trial_id for t in asha.trials]
    assert asha.scheduler.type == "asha" and plain.scheduler.type == "none"


# Third pass: sizes and hostile folders, through the commands a user runs; exit 0 or 2 within 10 s.
def _hostile_model(folder: Path, tiny_model_factory, **config) -> str:
    tiny_model_factory("llama").save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(data | config))
    return str(folder)


def _third_pass(tmp_path: Path, tiny_model_factory) -> dict:
    axes = {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}

    def model(name: str, **config) -> dict:
        return {"axes": axes | {"model": [_hostile_model(tmp_path / name, tiny_model_factory, **config)]}}

    product = {"seed": list(range(1000)), "lr": [1e-3] * 1000, "data_budget_tokens": list(range(1000, 2000))}
    return {
        "10^9 trials": {"axes": axes | product},
        "20,000 includes": {"axes": axes, "include": [{"seed": i} for i in range(20_000)]},
        "99,001 model copies": {"axes": axes | {"model": ["smollm2-135m"] * 99_001}},
        "model /": {"axes": axes | {"model": ["/"]}},
        "10^6 layers": model("layers", num_hidden_layers=1_000_000),
        "width a string": model("string", intermediate_size="96"),
        "width NaN": model("nan", intermediate_size=float("nan")),
        "an encoder": model("bert", architectures=["BertForMaskedLM"]),
        "code through auto_map": model("code", auto_map={"AutoConfig": "evil.C"}) | {"trust_remote_code": True},
        "lr 1e15": {"axes": axes, "train": {"lr": 1e15}},
        "betas above 1": {"axes": axes, "train": {"betas": [0.9, 1.5]}},
        "cpus 10^6": {"axes": axes, "resources": {"cpus_per_trial": 10**6}},
    }


def test_third_pass_structures_exit_0_or_2_quickly(tmp_path, tiny_model_factory, capsys):
    cases = _third_pass(tmp_path, tiny_model_factory)
    capsys.readouterr()  # the model folders' save messages
    for name, data in cases.items():
        path = write(tmp_path, data, "g.yaml")
        start = time.perf_counter()
        try:
            code = sweep_main([str(path), "--dry-run"])
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name}: {type(error).__name__}: {error}")
        err = capsys.readouterr().err
        assert code in (0, 2) and time.perf_counter() - start < 10, (name, code)
        if name != "code through auto_map":  # validation reads configs as JSON: auto_map alone is harmless
            assert code == 2 and err.startswith("error: "), (name, err[:300])
