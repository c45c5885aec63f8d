"""What a model folder, a grid or a trial folder says never runs code, and hostile model
configs are refused in one line (issue 31: security, tracebacks, accepted nonsense)."""

import json
import re

import pytest
import sweep_assets

from harness.config import ConfigError
from harness.grid import expand_grid

CANARY = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('yes')\n"


def custom_code_model(folder, tiny_model_factory, **config_overrides):
    """A real tiny checkpoint whose config.json points at a Python file through auto_map."""
    model = tiny_model_factory("llama")
    model.save_pretrained(folder)
    (folder / "evil.py").write_text(CANARY)
    config = json.loads((folder / "config.json").read_text())
    config |= {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config | config_overrides))
    return folder


def grid(model, **top):
    return {"axes": {"model": [str(model)], "n_experts": [4], "top_k": [2]}, **top}


def test_validating_a_grid_with_trust_remote_code_runs_no_model_code(tmp_path, tiny_model_factory):
    folder = custom_code_model(tmp_path / "m", tiny_model_factory)
    sweep = expand_grid(grid(folder, trust_remote_code=True))  # what --dry-run does
    assert len(sweep.trials) == 2 and not (folder / "RAN").exists()


@pytest.mark.parametrize(
    "width,message",
    [
        ("96", "intermediate_size '96' is not a whole number"),
        (None, "intermediate_size None is not a whole number"),
        (96.0, "intermediate_size 96.0 is not a whole number"),
        (float("nan"), "intermediate_size nan is not a whole number"),
        (0, "intermediate_size 0 is not a whole number"),
        (-96, "intermediate_size -96 is not a whole number"),
        (True, "intermediate_size True is not a whole number"),
    ],
)
def test_a_config_with_a_nonsense_ffn_width_is_refused_in_one_line(tmp_path, tiny_model_factory, width, message):
    folder = custom_code_model(tmp_path / "m", tiny_model_factory, intermediate_size=width)
    with pytest.raises(ConfigError) as error:
        expand_grid(grid(folder))
    (problem,) = error.value.problems
    assert message in problem and "\n" not in problem


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, tiny_model_factory):
    folder = custom_code_model(tmp_path / "m", tiny_model_factory, architectures=["BertForMaskedLM"])
    with pytest.raises(ConfigError, match="is BertForMaskedLM: FactorLLM converts causal LMs"):
        expand_grid(grid(folder))


def test_a_config_that_is_not_json_is_refused(tmp_path, tiny_model_factory):
    folder = custom_code_model(tmp_path / "m", tiny_model_factory)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        expand_grid(grid(folder))


def test_export_never_takes_trust_remote_code_from_a_record(tmp_path, cache_dir, capsys):
    """A trial folder handed over with trust_remote_code: true edited into its record, whose source
    model names a Python file: the export refuses before anything of the model is loaded."""
    from harness.config import TrialConfig
    from harness.export import main
    from harness.trial import Trial

    factor = {"n_experts": 4, "top_k": 2, "combine": "weighted", "router_bias": False}
    config = TrialConfig.from_dict(
        sweep_assets.trial_config(tmp_path) | {"latency": {"enabled": False}, "factor": factor}
    )
    assert Trial(config, tmp_path / "runs").run()["status"] == "completed"
    folder = tmp_path / "runs" / config.trial_id
    record = json.loads((folder / "record.json").read_text())
    record["config"]["trust_remote_code"] = True
    (folder / "record.json").write_text(json.dumps(record))
    source = tmp_path / "ckpt"  # the trial's source model (sweep_assets)
    (source / "evil.py").write_text(CANARY)
    model_config = json.loads((source / "config.json").read_text())
    model_config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (source / "config.json").write_text(json.dumps(model_config))
    capsys.readouterr()
    assert main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names its own code (auto_map" in err[0] and "--trust-remote-code" in err[0]
    assert not (source / "RAN").exists() and not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused_without_walking_it(tmp_path):
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="model '/' is a folder without config.json: not a model checkpoint"):
        expand_grid(grid("/"))
    assert time.perf_counter() - start < 5


def test_the_fingerprint_of_a_checkpoint_folder_is_unchanged(tmp_path, tiny_model_factory):
    """Dense baselines are found by it: the bounded walk must give the old rglob order's digest."""
    import hashlib

    from harness.assets.models import _folder_fingerprint

    folder = tmp_path / "m"
    tiny_model_factory("llama").save_pretrained(folder)
    for name in ("model.x", "model/x", "model-b/y", "a/b/c.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    digest = hashlib.sha256()  # the implementation before the bound
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    assert _folder_fingerprint(folder) == digest.hexdigest()[:16]


@pytest.mark.parametrize(
    "grid_data,message",
    [
        ({"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2], "seed": list(range(100)),
                   "lr": [1e-3 + i * 1e-5 for i in range(100)]}},
         "the grid expands to 10,000 trials (100 seed x 100 lr); at most 2,000"),
        ({"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]},
          "include": [{"seed": i} for i in range(20_000)]},
         "include: 20,000 variants; at most 2,000"),
    ],
)  # fmt: skip
def test_a_grid_too_large_to_run_is_refused_at_once_with_its_size(grid_data, message):
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand_grid(grid_data)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "section,values,message",
    [
        ("train", {"lr": 1e15}, "train.lr: 1e+15 is outside [1e-08, 10] (a learning rate"),
        ("train", {"lr": 5e-324}, "train.lr: 4.94066e-324 is outside [1e-08, 10]"),
        ("train", {"betas": [0.9, 1.5]}, "train.betas: [0.9, 1.5] is outside [0, 1) (Adam's moment decays)"),
        ("train", {"betas": [-5, -5]}, "train.betas: [-5, -5] is outside [0, 1)"),
        ("eval", {"sample_seed": -1}, "eval.sample_seed: -1 is outside [0, 2147483647] (a seed)"),
        ("failure", {"max_failures": 10**15}, "failure.max_failures: 1e+15 is outside [0, 100]"),
        ("resources", {"gpus_per_trial": 10**6}, "resources.gpus_per_trial: 1e+06 is outside [0, 64]"),
        ("resources", {"cpus_per_trial": 10**5}, "resources.cpus_per_trial: 100000 is outside [1, 1024]"),
    ],
)
def test_nonsense_numbers_are_refused_with_their_physical_range(section, values, message):
    data = {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [2]}, section: values}
    with pytest.raises(ConfigError) as error:
        expand_grid(data)
    (problem,) = error.value.problems
    assert problem.startswith(message), problem


@pytest.mark.parametrize(
    "changes,message",
    [
        # a YAML key 1 or ~ gave "'<' not supported between instances of 'NoneType' and 'int'"
        ({"factor": {1: 2, None: 3}}, "factor.1: not an option name (keys are text); allowed: combine, "),
        # gave the 100-digit number twice: "must be in [1, 4096]" and "does not divide the FFN width"
        ({"axes": {"n_experts": [10**100]}}, "factor.n_experts: 1e+100 is above the limit of 4,096 experts per layer"),
        ({"storage": "/proc/sweeps"}, "storage: /proc/sweeps is on the kernel's proc file system, which holds no"),
        ({"train": {"corpus": "EMPTY"}}, "train.corpus: corpus='EMPTY' holds no text (its files are empty or "),
        ({"eval": {"heldout_text": "BLANK"}}, "eval.heldout_text: corpus='BLANK' holds no text"),
    ],
)
def test_wrong_inputs_get_one_right_message(changes, message, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\t\n")
    (tmp_path / "blank" / "b.jsonl").write_text("\n\n")
    places = {"EMPTY": str(tmp_path / "empty.txt"), "BLANK": str(tmp_path / "blank")}
    data = {"axes": {"model": ["smollm2-135m"], "n_experts": [4], "top_k": [1]}}
    for key, value in changes.items():
        if isinstance(value, dict) and key in data:
            data[key] = data[key] | value
        elif isinstance(value, dict):
            data[key] = {k: places.get(v, v) if isinstance(v, str) else v for k, v in value.items()}
        else:
            data[key] = value
    with pytest.raises(ConfigError) as error:
        expand_grid(data)
    (problem,) = error.value.problems
    assert problem.startswith(message.replace("EMPTY", places["EMPTY"]).replace("BLANK", places["BLANK"])), problem


def test_a_corpus_with_text_past_what_validation_reads_is_accepted(tmp_path):
    from harness.assets.corpora import TEXT_CHECK_BYTES, resolve_corpus

    late = tmp_path / "late.txt"
    late.write_text(" " * (TEXT_CHECK_BYTES + 10) + "words at last")
    assert resolve_corpus(str(late)).name == str(late)


def test_a_trial_larger_than_any_node_is_refused_instead_of_waiting_forever():
    from harness.grid import Resources
    from harness.tune.cluster import ClusterUnreachable, largest_node, resolve_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    largest = largest_node(nodes)
    assert largest == {"CPU": 2.0, "GPU": 0}  # a dead node offers nothing
    cluster = {"CPU": 2.0}
    assert resolve_resources(Resources(cpus_per_trial=2), cluster, largest) == {"cpu": 2, "gpu": 0.0}
    with pytest.raises(ClusterUnreachable, match=r"resources.cpus_per_trial: 1000 is more than any node .* \(2 CPUs"):
        resolve_resources(Resources(cpus_per_trial=1000), cluster, largest)
    with pytest.raises(ClusterUnreachable, match=r"resources.gpus_per_trial: 1 is more than any node .* \(0 GPUs"):
        resolve_resources(Resources(gpus_per_trial=1), cluster, largest)


def test_a_model_too_large_for_this_machine_is_refused_before_anything_is_allocated(
    tmp_path, tiny_model_factory, capsys
):
    import time

    from harness.trial import main as trial_main

    folder = custom_code_model(tmp_path / "m", tiny_model_factory, num_hidden_layers=1_000_000)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"describes ~\d+\.\dB parameters, \d+ GiB in fp32, more than this machine"):
        expand_grid(grid(folder))
    (tmp_path / "t.yaml").write_text(f"model: {folder}\n")
    assert trial_main([str(tmp_path / "t.yaml"), "--out", str(tmp_path / "runs")]) == 2
    assert "more than this machine's" in capsys.readouterr().err
    assert time.perf_counter() - start < 10 and not (folder / "RAN").exists()
