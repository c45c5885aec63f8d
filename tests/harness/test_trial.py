"""A whole trial on a tiny random Llama saved as a local checkpoint, with a tiny corpus."""

import json
import math

import pytest
import torch
from conftest import CALIBRATED

from factorllm_core import factorized_layers
from harness.config import ConfigError, TrialConfig
from harness.trial import Trial, run_trial
from reports.record import SCHEMA

WORDS = (
    "the a cat dog sat ran on in mat house big small red blue one two and or but so man woman is was he she it they"
).split()


@pytest.fixture
def tiny_checkpoint(tmp_path_factory, tiny_model_factory, word_tokenizer):
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    tiny_model_factory("llama").save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
        for n in torch.randint(20, 80, (80,), generator=g)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def config(checkpoint, corpus, mode="par", budget=1000, **train):
    return TrialConfig.from_dict(
        {
            "model": checkpoint,
            "device": "cpu",
            "factor": None if mode == "dense" else {"n_experts": 4, "top_k": 2, "router_mode": mode},
            "train": {
                "data_budget_tokens": budget,
                "corpus": corpus,
                "seq_len": 64,
                "batch_size": 2,
                "lr": 1e-3,
                "checkpoint_every": 2,
                **train,
            },
            "eval": {"tasks": ["arc_easy"], "limit": 2},
            "flops": {"seq_len": 64},
            "latency": {"prefill_len": 16, "decode_tokens": 2, "repeats": 1, "warmup": 0},
        }
    )


def run(cfg, tmp_path, **kwargs):
    trial = Trial(cfg, tmp_path / "runs", **kwargs)
    return trial, trial.run()


@pytest.mark.parametrize(
    "mode,router_trained", [("par", True), ("lm_only", True), ("random", False), ("frozen", False)]
)
def test_every_router_mode_completes_and_trains_what_it_should(
    tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, mode, router_trained
):
    cfg = config(tiny_checkpoint, tiny_corpus, mode)
    trial, record = run(cfg, tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["training"]["tokens"] == 1000  # exactly the budget (1000 = 15 x 64 + 40)
    assert (record["training"]["final"]["pa"] is not None) == (mode == "par")
    assert record["metrics"]["arc_easy"]["n"] == 2
    layer = factorized_layers(trial.model)[0][1]
    reference = Trial(cfg, tmp_path / "unused")
    reference._load()
    from factorllm_core import factorize

    factorize(reference.model, cfg.factor)
    fresh = factorized_layers(reference.model)[0][1]
    assert torch.equal(layer.router.gate.weight, fresh.router.gate.weight) != router_trained
    assert not torch.equal(layer.experts.up_weight, fresh.experts.up_weight)  # experts train in every mode
    on_disk = json.loads((tmp_path / "runs" / cfg.trial_id / "record.json").read_text())
    assert on_disk["trial_id"] == cfg.trial_id and on_disk["status"] == "completed"
    routing = record["routing"]["layers"][0]
    assert sum(routing["expert_load"]) == routing["tokens"] * 2
    assert 0 < routing["expert_similarity"] < 1


def test_record_is_self_describing(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, capfd):
    cfg = config(tiny_checkpoint, tiny_corpus)
    _, record = run(cfg, tmp_path)
    # the console: one line per stage and one for the finished trial; the rest is in the trial log
    console = capfd.readouterr().out.splitlines()
    assert len(console) == len(record["stage_seconds"]) + 1, console
    assert all(line.startswith(f"[{cfg.trial_id}] ") for line in console) and "completed" in console[-1]
    trial_log = (tmp_path / "runs" / cfg.trial_id / "trial.log").read_text()
    assert "harness.train: train 1000/1000 tokens" in trial_log and "arc_easy: acc_norm=" in trial_log
    for key in (
        "trial_id",
        "config",
        "status",
        "metrics",
        "flops",
        "latency",
        "speedup",
        "training",
        "routing",
        "environment",
        "stage_seconds",
        "dense_reference",
        "factorization",
    ):
        assert key in record, key
    assert record["config"]["factor"]["top_k"] == 2
    assert record["flops"]["convention"].startswith("fvcore: 1 FLOP per multiply-add")
    assert record["environment"]["torch"] == torch.__version__
    assert set(record["stage_seconds"]) == {
        "load",
        "dense_reference",
        "factorize",
        "train",
        "evaluate",
        "heldout",
        "measure",
        "analyze",
    }
    assert record["schema"] == SCHEMA and record["eval_dtype"] == "float32"
    assert record["setting"] == "1R4E2K" and record["active_fraction"] == 0.5 and record["paper_recipe"]
    items = record["metrics"]["arc_easy"]["items"]
    assert len(items["id"]) == 2 and set(items) == {"id", "correct", "pred", "gold", "n_choices", "lls", "scores"}
    assert [len(lls) for lls in items["lls"]] == items["n_choices"]
    assert items["pred"] == [max(range(len(s)), key=s.__getitem__) for s in items["scores"]]
    # the default scorer ran every request (4-5 choices per item) itself, and says so
    assert record["eval_lm"] == {"lm": "shared", "requests": {"shared": sum(items["n_choices"])}, "hflm_reason": None}
    assert record["metrics"]["arc_easy"]["lm_paths"] == {"shared": sum(items["n_choices"])}
    assert record["metrics"]["arc_easy"]["chance"] == pytest.approx(sum(1 / n for n in items["n_choices"]) / 2)
    heldout = record["heldout"]
    assert heldout["sequences"] == 2048 // 128 == len(heldout["per_sequence_loss"]) == len(heldout["per_sequence_kl"])
    assert heldout["kl_from_dense"] > 0  # trained experts moved the distribution
    assert "expert_similarity" in record["routing_at_factorization"]
    churn = record["training"]["churn"]
    assert churn["every"] == 1 and [p[0] for p in churn["series"]] == list(range(1, 9))  # 8 steps
    assert all(0 <= p[1] <= 1 for p in churn["series"])
    assert len(record["speedup"]["prefill_rounds"]) == 1
    dense_latency = record["dense_reference"]["latency"]
    assert dense_latency["interleaved"] and record["latency"]["interleaved"]
    assert record["speedup"]["prefill"] == pytest.approx(
        record["latency"]["prefill_tokens_per_s"] / dense_latency["prefill_tokens_per_s"]
    )
    ffn, dense_ffn = record["flops"]["ffn_gflops_per_token"], record["dense_reference"]["flops"]["ffn_gflops_per_token"]
    assert ffn < 0.6 * dense_ffn  # K/N = 1/2 plus a tiny router


def test_dense_trial_skips_factorization_and_training(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    _, record = run(config(tiny_checkpoint, tiny_corpus, "dense"), tmp_path)
    assert record["status"] == "completed"
    assert "training" not in record and "routing" not in record and "speedup" not in record
    assert record["trial_id"].startswith("dense-")
    assert record["heldout"]["loss"] > 0 and "kl_from_dense" not in record["heldout"]


def test_zero_training_has_zero_kl_and_the_dense_loss(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    """K = N without training is the dense model exactly: KL 0 and the dense held-out
    loss, measured through the same code paths (the planted answer)."""
    cfg = TrialConfig.from_dict(
        {**config(tiny_checkpoint, tiny_corpus, budget=0).to_dict() | {"factor": {"n_experts": 4, "top_k": 4}}}
    )
    _, record = run(cfg, tmp_path)
    _, dense = run(config(tiny_checkpoint, tiny_corpus, "dense"), tmp_path)
    assert record["heldout"]["kl_from_dense"] == pytest.approx(0, abs=1e-6)
    assert record["heldout"]["per_sequence_loss"] == pytest.approx(dense["heldout"]["per_sequence_loss"], abs=1e-5)


def test_every_trial_with_the_same_eval_settings_sees_the_same_items(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    def ids(mode, seed=0):
        cfg = config(tiny_checkpoint, tiny_corpus, mode, budget=0)
        data = cfg.to_dict()
        data["eval"].update(tasks=["arc_easy", "mmlu"], limit=60, sample_seed=seed)
        _, record = run(TrialConfig.from_dict(data), tmp_path / f"{mode}{seed}")
        return {n: m["items"]["id"] for n, m in record["metrics"].items()}

    dense, factored, other_seed = ids("dense"), ids("par"), ids("par", seed=1)
    assert dense == factored
    assert dense["arc_easy"] != other_seed["arc_easy"]
    assert dense["arc_easy"] != [str(i) for i in range(60)]  # a random sample, not the first rows
    subjects = {item.split("/")[0] for item in dense["mmlu"]}
    assert len(dense["mmlu"]) == 60 and len(subjects) == 57  # stratified: every subject, 3 get a second row


def test_zero_budget_means_no_training(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    _, record = run(config(tiny_checkpoint, tiny_corpus, budget=0), tmp_path)
    assert record["status"] == "completed" and record["training"]["steps"] == 0


def test_non_finite_loss_fails_the_trial_without_numbers(
    tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("factorllm_core.ffn.pa_loss", lambda probs, labels: torch.tensor(float("nan")))
    _, record = run(config(tiny_checkpoint, tiny_corpus), tmp_path)
    assert record["status"] == "failed"
    assert record["error"].startswith("NonFiniteLoss: non-finite loss at optimizer step 1")
    assert "metrics" not in record and "flops" not in record and "latency" not in record


@pytest.mark.parametrize("mode", ["random", "par"])  # random: its RNG state must resume; par: the churn series
def test_resume_after_interruption_equals_uninterrupted_run(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, mode):
    cfg = config(tiny_checkpoint, tiny_corpus, mode, checkpoint_every=2, churn_points=5)
    straight, straight_record = run(cfg, tmp_path / "a")

    def crash(step):
        if step == 5:  # checkpoints are written at steps 2 and 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b", on_train_step=crash)
    assert not (tmp_path / "b" / "runs" / cfg.trial_id / "record.json").exists()
    resumed, resumed_record = run(cfg, tmp_path / "b")
    assert resumed_record["training"]["resumed_from_step"] == 4
    assert resumed_record["training"]["history"] == straight_record["training"]["history"]
    assert resumed_record["training"]["churn"] == straight_record["training"]["churn"]
    assert (resumed_record["training"]["churn"] is None) == (mode == "random")
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_the_rate_after_a_resume_is_this_process_tokens_over_its_own_seconds(
    tiny_checkpoint, tiny_corpus, cache_dir, tmp_path
):
    """Review bug 5: the rate divided the new tokens by the old and the new seconds together."""
    from harness.train import TRAIN_STATE

    cfg = config(tiny_checkpoint, tiny_corpus, checkpoint_every=2)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path, on_train_step=crash)
    path = tmp_path / "runs" / cfg.trial_id / "checkpoint" / TRAIN_STATE
    state = torch.load(path, weights_only=True)
    state["summary"]["seconds"] = 1e6  # the dead process trained for a long time
    torch.save(state, path)
    _, record = run(cfg, tmp_path)
    training = record["training"]
    resumed = [p for p in training["series"] if p["step"] > training["resumed_from_step"]]
    before = next(p["tokens"] for p in training["series"] if p["step"] == training["resumed_from_step"])
    assert resumed and all(p["tokens_per_s"] > (p["tokens"] - before) / 1000 for p in resumed)  # not / 10^6 s
    assert training["seconds"] > 1e6  # the total still counts both processes


def test_completed_trial_is_not_rerun(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, monkeypatch):
    cfg = config(tiny_checkpoint, tiny_corpus, budget=0)
    first = run_trial(cfg, tmp_path / "runs")
    monkeypatch.setattr("harness.trial.Trial.run", lambda self: pytest.fail("re-ran a completed trial"))
    again = run_trial(cfg, tmp_path / "runs")
    assert (again["trial_id"], again["started_at"]) == (first["trial_id"], first["started_at"])


def test_the_gpu_path_on_cpu_bf16_and_grouped_dispatch(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    """What a CUDA trial does that CPU torch can run: bf16 evaluation, bf16 autocast
    training and the host-sync-free `grouped` dispatch, forced. It completes with finite
    numbers and the FLOPs of the `sorted` path."""

    def with_path(dispatch):
        data = config(tiny_checkpoint, tiny_corpus, "par").to_dict()
        data.update(precision="bf16", dispatch=dispatch)
        return TrialConfig.from_dict(data)

    trial, record = run(with_path("grouped"), tmp_path / "grouped")
    assert record["status"] == "completed", record["error"]
    assert record["eval_dtype"] == "bfloat16" and record["precision"] == "bf16"
    assert next(trial.model.parameters()).dtype == torch.bfloat16
    assert {layer.experts.last_dispatch for _, layer in factorized_layers(trial.model)} == {"grouped"}
    assert all(math.isfinite(v) for v in record["heldout"]["per_sequence_loss"] + record["heldout"]["per_sequence_kl"])
    assert all(math.isfinite(step[1]) for step in record["training"]["history"])
    _, sorted_record = run(with_path("sorted"), tmp_path / "sorted")
    assert sorted_record["status"] == "completed", sorted_record["error"]
    assert record["flops"] == sorted_record["flops"]
    assert with_path("grouped").trial_id != config(tiny_checkpoint, tiny_corpus, "par").trial_id


def test_fused_dispatch_is_refused_for_training():
    with pytest.raises(ConfigError, match="dispatch: 'fused' must be one of auto, grouped, reference, sorted"):
        TrialConfig.from_dict({"factor": {"n_experts": 4, "top_k": 2}, "dispatch": "fused"})


def test_calibrated_recipe_with_distillation_spends_the_budget_once(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    data = config(tiny_checkpoint, tiny_corpus, lambda_kd=1.0).to_dict()
    data["train"]["calibration_tokens"] = 200
    data["factor"] |= CALIBRATED
    _, record = run(TrialConfig.from_dict(data), tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["calibration"]["tokens"] == 200 and record["training"]["tokens"] == 800  # 1000 in all
    f = record["factorization"]
    assert f["setting"] == "1R3E1K1S" and f["active_ffn_fraction"] == 0.5 and f["calibration_tokens"] == 200
    assert 0 <= f["router_fit"]["heldout_overlap"] <= 1 and f["router_fit"]["chance_overlap"] == pytest.approx(1 / 3)
    assert record["recipe"] == "mean_comp init=fit min_recon kd=1 cal=200"
    assert all(len(row) == 5 and row[4] > 0 for row in record["training"]["history"])  # [step, lm, pa, bal, kd]


def test_the_distillation_teacher_is_the_dense_model(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    """At K = N the factorized model is the dense one, so before the first update the
    distillation KL is 0; at K < N it is not."""

    def first_kd(top_k):
        data = config(tiny_checkpoint, tiny_corpus, lambda_kd=1.0, budget=128).to_dict()
        data["factor"]["top_k"] = top_k
        _, record = run(TrialConfig.from_dict(data), tmp_path / str(top_k))
        return record["training"]["history"][0][4]

    assert first_kd(4) == pytest.approx(0, abs=1e-6)
    assert first_kd(1) > 1e-4  # a random tiny model: small, but 100x the K = N bound


def test_layerwise_stage_cuts_the_heldout_reconstruction_error(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    data = config(tiny_checkpoint, tiny_corpus, layerwise_steps=30, layerwise_lr=3e-3, calibration_tokens=800).to_dict()
    data["factor"] |= {"n_experts": 4, "top_k": 1, "combine": "unscaled"}
    _, record = run(TrialConfig.from_dict(data), tmp_path)
    assert record["status"] == "completed", record["error"]
    lw = record["layerwise"]
    assert lw["steps"] == 30 and len(lw["per_layer"]) == 2
    assert lw["heldout_relative_error_after"] < lw["heldout_relative_error_before"]
    assert record["training"]["tokens"] == 200  # the stage reads no tokens of its own


def test_the_calibrated_recipe_on_the_gpu_path_on_cpu(tiny_checkpoint, tiny_corpus, cache_dir, tmp_path):
    """The calibrated recipe as a CUDA worker runs it, on the CPU: bf16 autocast training
    with distillation, the forced `grouped` dispatch, mean_comp's means, a shared expert
    and the layer-wise stage; bf16 evaluation. It completes with finite numbers."""
    data = config(tiny_checkpoint, tiny_corpus, lambda_kd=1.0, calibration_tokens=200, layerwise_steps=5).to_dict()
    data["factor"] |= CALIBRATED
    data.update(precision="bf16", dispatch="grouped")
    trial, record = run(TrialConfig.from_dict(data), tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["eval_dtype"] == "bfloat16" and next(trial.model.parameters()).dtype == torch.bfloat16
    assert {layer.experts.last_dispatch for _, layer in factorized_layers(trial.model)} == {"grouped"}
    assert all(math.isfinite(v) for row in record["training"]["history"] for v in (row[1], row[4]))
    assert all(math.isfinite(v) for v in record["heldout"]["per_sequence_loss"] + record["heldout"]["per_sequence_kl"])


def test_the_distillation_teacher_stays_dense_after_the_layerwise_stage(
    tiny_checkpoint, tiny_corpus, cache_dir, tmp_path, monkeypatch
):
    """The layer-wise stage changes the experts before training: the teacher must be the
    dense model from before it, not a merge of the fitted experts."""
    from transformers import AutoModelForCausalLM

    import harness.train

    seen = []
    original = harness.train._optimizer_step

    def spy(*args, **kwargs):
        seen.append(args[-1])  # the teacher
        return original(*args, **kwargs)

    monkeypatch.setattr(harness.train, "_optimizer_step", spy)
    data = config(
        tiny_checkpoint,
        tiny_corpus,
        lambda_kd=1.0,
        calibration_tokens=400,
        layerwise_steps=20,
        layerwise_lr=1e-2,
        budget=600,
    ).to_dict()
    data["factor"] |= {"top_k": 1, "combine": "unscaled"}
    _, record = run(TrialConfig.from_dict(data), tmp_path)
    assert record["status"] == "completed", record["error"]
    ids = torch.arange(20)[None]
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        assert (seen[0](input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() <= 1e-5


def test_a_completed_trial_keeps_its_trained_weights_and_drops_its_checkpoint(
    tiny_checkpoint, tiny_corpus, cache_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from factorllm_core import load_trained_ffns

    cfg = config(tiny_checkpoint, tiny_corpus)  # checkpoint_every=2: a checkpoint is written during training
    trial, record = run(cfg, tmp_path)
    folder = tmp_path / "runs" / cfg.trial_id
    files = record["files"]
    assert files["model"] == "model" and files["model_bytes"] > 0 and not files["checkpoint_kept"]
    assert files["checkpoint_bytes"] > files["model_bytes"]  # weights + optimizer state, against weights alone
    assert not (folder / "checkpoint").exists()
    assert json.loads((folder / "model" / "source.json").read_text())["name"] == tiny_checkpoint
    # the source model plus the saved layers are the trained model
    rebuilt = load_trained_ffns(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), folder / "model")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, trial.model.eval()(ids).logits)

    kept = config(tiny_checkpoint, tiny_corpus, budget=900)
    kept = TrialConfig.from_dict(kept.to_dict() | {"keep_checkpoints": True})
    assert kept.trial_id == config(tiny_checkpoint, tiny_corpus, budget=900).trial_id  # not part of the id
    _, record = run(kept, tmp_path)
    assert record["files"]["checkpoint_kept"] and (tmp_path / "runs" / kept.trial_id / "checkpoint").exists()
