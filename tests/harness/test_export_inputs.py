"""harness.export on what a user or a hostile folder hands it: every failure one line and exit 2
(130 on Ctrl-C), and never a half-written --out (issue 31: export checks, tracebacks)."""

import json

import pytest
import sweep_assets
import torch

from harness.config import TrialConfig
from harness.export import main
from harness.trial import Trial

FACTOR = {"n_experts": 4, "top_k": 2, "combine": "weighted", "router_bias": False}


@pytest.fixture
def trial(tmp_path, cache_dir):
    config = TrialConfig.from_dict(
        sweep_assets.trial_config(tmp_path) | {"latency": {"enabled": False}, "factor": FACTOR}
    )
    assert Trial(config, tmp_path / "runs").run()["status"] == "completed"
    return tmp_path / "runs" / config.trial_id


def leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if ".tmp-" in p.name)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def claims_eight(folder):
    edit_json(folder / "record.json", lambda r: r["config"]["factor"].update(n_experts=8))


def other_source(folder):
    edit_json(folder / "model" / "source.json", lambda s: s.update(name="smollm2-135m"))


def truncated(folder):
    path = folder / "model" / "ffns.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def bad_source_json(folder):
    (folder / "model" / "source.json").write_text("[1, 2")


def no_model(folder):
    edit_json(folder / "record.json", lambda r: r.pop("model"))


HOSTILE = {
    "record without model": (no_model, "the record does not say which model it converted"),
    "record claims other layers": (claims_eight, "holds 1R4E2K layers, but the record says 1R8E2K"),
    "source.json names another model": (other_source, "names 'smollm2-135m'"),
    "truncated ffns.safetensors": (truncated, "the trained layers do not load"),
    "invalid source.json": (bad_source_json, "unreadable or incomplete kept weights"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_trial_folder_that_contradicts_itself_is_refused_in_one_line(trial, tmp_path, capsys, case):
    damage, message = HOSTILE[case]
    damage(trial)
    capsys.readouterr()
    assert main([str(trial), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_plain_new_folder_outside_the_trial(trial, tmp_path, capsys):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    for out, message in ((link, "is a symbolic link"), (trial / "model" / "x", "inside the trial's own kept weights")):
        capsys.readouterr()
        assert main([str(trial), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_gguf_without_the_extra_is_refused_before_anything_is_written(trial, tmp_path, capsys, monkeypatch):
    from harness import serve

    def missing():
        raise serve.ServeUnavailable(f"llama.cpp's converter is not installed: {serve.INSTALL_HINT}")

    monkeypatch.setattr(serve, "llama_cpp_source", missing)
    capsys.readouterr()
    assert main([str(trial), "--out", str(tmp_path / "out"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FACTORLLM_SERVE=1 bash install.sh" in err[0]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_writing_exits_130_and_leaves_nothing(trial, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    capsys.readouterr()
    assert main([str(trial), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted: nothing written" in err[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_the_check_after_reloading_is_enforced(trial, tmp_path, capsys, monkeypatch):
    """Review bug 2: the reloaded folder's difference was recorded, not enforced, and a failure there
    left a half-written --out that blocked the retry."""
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained.__func__

    def corrupted(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        with torch.no_grad():
            model.lm_head.weight.add_(0.1)  # what a bad save or load would do
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(corrupted))
    capsys.readouterr()
    assert main([str(trial), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the written folder, loaded back, differs" in err[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
    monkeypatch.undo()
    assert main([str(trial), "--out", str(tmp_path / "out")]) == 0  # the retry is not blocked


def test_a_second_export_to_the_same_folder_does_not_overwrite_the_first(trial, tmp_path, word_tokenizer):
    from harness.export import export
    from harness.trial_folder import heldout_ids, load_trial

    model, tokenizer, record = load_trial(trial)
    ids = heldout_ids(tokenizer, record, 128)
    export(model, tokenizer, ids, tmp_path / "out")
    written = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="was written by another export meanwhile"):
        export(model, tokenizer, ids, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == written
