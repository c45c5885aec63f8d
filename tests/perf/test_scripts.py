"""The benchmark scripts run end to end on tiny CPU presets, and refuse to time wrong outputs."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "perf"))  # the scripts import their shared checks from beside them


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ffn_dispatch_prints_a_row_per_path_after_the_checks(capsys):
    load("ffn_dispatch").main(["--preset", "tiny-cpu", "--repeats", "2"])
    out = capsys.readouterr().out
    assert out.count("correctness:") == 7  # sorted + grouped for K = 1..3, and K = N vs dense
    for top_k in (1, 2, 3):
        for path in ("reference", "sorted", "grouped"):
            assert f"| {path} 1R4E{top_k}K |" in out
    assert "fused" not in out  # CUDA only


def test_ffn_dispatch_spread_is_the_middle_half_of_the_round_ratios():
    bench = load("ffn_dispatch")
    rounds = {"fast": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0], "ideal": [2.0] * 8}  # ratios 1..8
    assert bench.ratio(rounds, "fast", "ideal") == 4.5
    assert bench.spread(rounds, "fast", "ideal") == "2.25-6.75"  # quartiles of 1..8
    assert bench.spread({"fast": [2.0, 4.0], "ideal": [2.0, 2.0]}, "fast", "ideal") == ""  # too few rounds


def test_ffn_dispatch_refuses_a_wrong_fast_path():
    bench = load("ffn_dispatch")
    x = torch.randn(8, 4)
    with pytest.raises(SystemExit, match="correctness check failed"):
        bench.check_close("broken", lambda t: t, lambda t: t * 1.01, x)
    with pytest.raises(SystemExit, match="correctness check failed"):
        bench.check_close("nan", lambda t: t, lambda t: t * float("nan"), x)


def test_model_prefill_checks_then_times_every_dispatch(capsys):
    load("model_prefill").main(["--preset", "tiny-cpu", "--repeats", "1", "--dispatch", "sorted,grouped"])
    out = capsys.readouterr().out
    assert "correctness: K=N vs dense logits" in out
    assert "correctness: grouped vs reference dispatch logits, 1R4E2K" in out
    for row in ("| dense |", "| 1R4E1K sorted |", "| 1R4E1K grouped |", "| 1R4E2K sorted |", "| 1R4E2K grouped |"):
        assert row in out


def test_gpu_presets_stop_with_one_line_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        load("ffn_dispatch").main(["--preset", "tinyllama-gpu"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        load("model_prefill").main(["--preset", "tinyllama-gpu"])


def test_dispatch_grad_check_passes_on_cpu(capsys):
    with pytest.raises(SystemExit) as done:
        load("dispatch_grad_check").main(["--device", "cpu"])
    assert done.value.code == 0
    assert capsys.readouterr().out.count(" ok") == 6  # sorted and grouped, K = 1..3


HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_fused_kernels_compile_for_hopper_with_wgmma_and_pipelined_loads(capsys, monkeypatch):
    """Ahead-of-time compilation to an sm_90 cubin, no GPU needed: the only check in
    CI that the kernels are valid GPU code (the interpreter test runs them as Python)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from factorllm_core import fused_kernels

    load("fused_compile_check").main(["--arch", "90"])
    out = capsys.readouterr().out
    assert out.count("| yes | yes | none |") == 2 * len(fused_kernels.CONFIGS)
    assert f"all {2 * len(fused_kernels.CONFIGS)} compiled kernels pass" in out


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_fused_compile_check_flags_a_config_over_the_shared_memory(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton

    too_big = triton.Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=3)
    gate_up, down = load("fused_compile_check").check(arch=90, configs=[too_big])
    assert gate_up.problems == [f"needs {gate_up.shared} B shared memory > 232448"]  # two weight tiles per stage
    assert down.problems == [] and down.pipelined and down.tensor_cores


def test_gpu_trial_runs_a_whole_trial_without_lm_eval_or_fvcore(capsys, monkeypatch, tmp_path):
    """The GPU check's whole-trial step, on a tiny model on the CPU: it must not import
    lm-eval or fvcore (the device image has neither) and must end completed."""
    import harness.trial

    gpu_trial = load("gpu_trial")
    monkeypatch.setattr(harness.trial, "probe_tokens", harness.trial.probe_tokens)  # the script swaps it
    for name in ("lm_eval", "fvcore"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of either now fails
    assert gpu_trial.main(["--size", "tiny", "--device", "cpu", "--budget", "2048"]) == 0
    out = capsys.readouterr().out
    assert "whole trial: completed" in out and "KL(dense || model)" in out and "precision fp32" in out
    work = tmp_path / "work"
    argv = ["--size", "tiny", "--device", "cpu", "--budget", "1024", "--recipe", "calibrated", "--workdir", str(work)]
    assert gpu_trial.main(argv) == 0
    out = capsys.readouterr().out
    assert "whole trial: completed" in out and "1R3E1K1S" in out and "layerwise" in out
    # what the GPU check's vLLM step is given: the kept trial, which exports exactly
    (folder,) = (work / "runs").iterdir()
    assert f"trial folder: {folder}" in out
    from harness import export

    assert export.main([str(folder), "--out", str(tmp_path / "exported")]) == 0
    assert '"exact": true' in (tmp_path / "exported" / "factorllm_export.json").read_text()


def test_served_speed_says_when_vllm_is_absent(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, as on this machine
    assert load("served_speed").main(["some-trial", "--engine", "vllm", "--quant", "bf16"]) == 2
    assert "vLLM is not importable here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        load("served_speed").main(["some-trial", "--engine", "vllm", "--quant", "q8_0"])
    assert stop.value.code == 2 and "--quant q8_0: vllm takes bf16, f16, f32" in capsys.readouterr().err


def test_eval_throughput_compares_both_lms_on_the_same_items(tmp_path, capsys):
    """On a tiny local checkpoint: one row per benchmark, identical choices, tiny differences."""
    from conftest import TINY  # tests/conftest.py (on the path from pyproject), before tests/harness's own

    sys.path.insert(0, str(ROOT / "tests" / "harness"))
    from test_shared_prefix import bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 2048})
    ).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    load("eval_throughput").main(
        ["--model", str(tmp_path / "ckpt"), "--tasks", "arc_easy,winogrande", "--limit", "3", "--batch-size", "2"]
    )
    rows = [
        line.split("|")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| arc_easy") or line.startswith("| winogrande")
    ]
    assert len(rows) == 2
    for row in rows:
        assert row[2].strip() == "3" and row[9].strip() == "0"  # items, choices that differ
        assert float(row[8]) < 1e-4  # largest log-likelihood difference
        assert float(row[7].strip().rstrip("x")) > 1  # arithmetic ratio: HFLM runs more
        hflm, shared = row[10].split("/")
        assert hflm.strip() == shared.strip()


def test_packed_scoring_check_agrees_with_hflm_style_scoring(capsys):
    assert load("packed_scoring_check").main(["--size", "tiny", "--device", "cpu", "--questions", "6"]) == 0
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| dense") or line.startswith("| 1R4E2K")
    ]
    assert len(rows) == 2 and all(row.endswith("| ok |") for row in rows)


def test_kl_memory_checks_the_bits_then_prints_both_peaks_and_their_ratio(capsys):
    assert load("kl_memory").main(["--batch", "1", "--positions", "300", "--vocab", "20000"]) == 0
    out = capsys.readouterr().out
    assert "bit for bit" in out and "| reference |" in out and "| blocked |" in out
    assert float(out.split("blocked / reference peak memory: ")[1].split()[0]) > 0  # measured, not n/a


def test_kl_memory_refuses_to_measure_a_blocked_kl_that_differs(monkeypatch, capsys):
    bench = load("kl_memory")
    monkeypatch.setattr(bench, "distillation_kl", lambda d, s, m: 1.0001 * bench.distillation_kl_reference(d, s, m))
    assert bench.main([]) == 1
    assert "FAILED" in capsys.readouterr().out
