"""The report from a fixture of records: paired intervals, chance, pairs, flags, files."""

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest

from reports import stats
from reports.build import build_report
from reports.record import SCHEMA, load_records
from reports.tables import dense_above_chance, failed_trials, failure_flags, pair_differences, pareto_front, trial_frame

TASKS = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa", "mmlu"]
METRIC = {
    t: "acc_norm" if t in ("hellaswag", "openbookqa", "arc_easy", "arc_challenge", "piqa") else "acc" for t in TASKS
}
CHOICES = {t: 2 if t in ("winogrande", "boolq", "piqa") else 4 for t in TASKS}
N_ITEMS = 200
EVAL = {
    "tasks": TASKS,
    "limit": N_ITEMS,
    "num_fewshot": 0,
    "source": "local",
    "batch_size": 16,
    "sample_seed": 0,
    "heldout_text": "lee-news",
    "heldout_tokens": 2048,
    "heldout_seq_len": 128,
}


def outcomes(accuracy: float, seed: int) -> list[int]:
    """Exactly round(accuracy x N) correct items, at seeded positions."""
    correct = np.zeros(N_ITEMS, dtype=int)
    correct[np.random.default_rng(seed).permutation(N_ITEMS)[: round(accuracy * N_ITEMS)]] = 1
    return correct.tolist()


def metrics(scores: dict, seed: int) -> dict:
    out = {}
    for i, (name, accuracy) in enumerate(scores.items()):
        correct = outcomes(accuracy, seed * 100 + i)
        items = {
            "id": [str(j) for j in range(N_ITEMS)],
            "correct": correct,
            "pred": [0] * N_ITEMS,
            "gold": [0] * N_ITEMS,
            "n_choices": [CHOICES[name]] * N_ITEMS,
        }
        out[name] = {
            "name": name,
            "metric": METRIC[name],
            "value": sum(correct) / N_ITEMS,
            "stderr": 0.03,
            "n": N_ITEMS,
            "seconds": 1.0,
            "metrics": {},
            "chance": 1 / CHOICES[name],
            "chance_rule": "uniform",
            "items": items,
        }
    return out


def names(factor, train: dict) -> dict:
    """What the harness derives from a config when it writes a record (TrialConfig.describe)."""
    from factorllm_core import FactorConfig
    from harness.config import TrainConfig, TrialConfig

    config = TrialConfig(model="m", factor=FactorConfig(**factor) if factor else None, train=TrainConfig(**train))
    described = config.describe()
    keys = ("variant", "setting", "recipe", "active_fraction", "paper_recipe", "factors", "factor_defaults")
    return {k: described[k] for k in keys}


def record(
    trial_id,
    factor=None,
    scores=0.6,
    ffn=1.0,
    attention=0.5,
    budget=20000,
    routing=None,
    speedup=None,
    status="completed",
    drop=(),
    loss=3.0,
    kl=None,
    seed=0,
    churn=None,
    similarity_at_start=0.2,
    train=None,
):
    scores = scores if isinstance(scores, dict) else {n: scores for n in TASKS}
    scores = {n: v for n, v in scores.items() if n not in drop}
    sequences = np.random.default_rng(seed + 7).normal(0, 0.05, 16)
    train = {"data_budget_tokens": budget, "lr": 1e-3} | (train or {})
    rec = {
        "trial_id": trial_id,
        "label": trial_id,
        "status": status,
        "error": None,
        "schema": SCHEMA,
        "stage_seconds": {},
        **names(factor, train),
        "eval_dtype": "float32",
        "environment": {"device": "cpu"},
        "model": {"pretraining_tokens": 2e12},
        "config": {"model": "m", "factor": factor, "seed": 0, "eval": dict(EVAL), "train": train},
        "metrics": metrics(scores, seed),
        "flops": {
            "attention_gflops_per_token": attention,
            "ffn_gflops_per_token": ffn,
            "total_gflops_per_token": attention + ffn + 0.1,
        },
        "heldout": {"loss": loss, "per_sequence_loss": (loss + sequences).tolist()},
        "speedup": speedup,
        "routing": routing,
    }
    if factor:
        rec["dense_reference"] = {
            "flops": {"attention_gflops_per_token": 0.5, "ffn_gflops_per_token": 1.0, "total_gflops_per_token": 1.6}
        }
        rec["routing_at_factorization"] = {"expert_similarity": similarity_at_start}
        rec["heldout"]["per_sequence_kl"] = None if kl is None else (kl + sequences / 10).tolist()
        rec["training"] = {"churn": {"every": 1, "series": churn or [[s, 0.3 / s] for s in range(1, 10)]}}
    if status != "completed":
        rec.update(error="NonFiniteLoss: non-finite loss at optimizer step 3", metrics=None, flops=None, heldout=None)
    return rec


def factor(k, mode="par", n=4, r=1):
    return {
        "n_experts": n,
        "top_k": k,
        "n_routers": r,
        "router_mode": mode,
        "partition": "contiguous",
        "combine": "scaled",
        "pseudo_label": "min_mse",
        "seed": 0,
    }


def routing(similarity=0.2, agreement=None, imbalance=1.2, layers=None):
    return {
        "summary": {
            "expert_similarity": similarity,
            "router_agreement": agreement,
            "load_max_over_mean": imbalance,
            "routing_entropy_normalized": 0.9,
        },
        "layers": layers or [{"expert_load": [10, 20, 30, 40]}, {"expert_load": [25, 25, 25, 25]}],
    }


@pytest.fixture
def records():
    dense_scores = {n: 0.6 for n in TASKS} | {"mmlu": 0.25}  # mmlu at chance for the dense model
    # fmt: off
    return [
        record("dense", scores=dense_scores, ffn=1.0, loss=3.0),
        record("k1", factor(1), scores=0.4, ffn=0.26, routing=routing(imbalance=2.5), loss=6.0, kl=2.5, seed=1,
               speedup={"prefill": 1.3, "prefill_rounds": [1.2, 1.3, 1.4]}),
        record("k2", factor(2), scores={n: 0.57 for n in TASKS} | {"mmlu": 0.2}, ffn=0.51, routing=routing(),
               loss=3.5, kl=0.5, seed=2, speedup={"prefill": 0.95, "prefill_rounds": [0.9, 0.95, 0.97]}),
        record("k2rand", factor(2, "random"), scores=0.3, ffn=0.51, routing=routing(similarity=0.5), loss=7.0,
               kl=3.0, seed=3),
        record("k3", factor(3), scores={n: 0.58 for n in TASKS}, ffn=0.76, routing=routing(), drop=("mmlu",),
               loss=3.2, kl=0.2, seed=4),  # a missing benchmark
        record("2r", factor(2, r=2), scores={n: 0.55 for n in TASKS} | {"mmlu": 0.2}, ffn=0.52, attention=0.9,
               routing=routing(agreement=0.55, similarity=0.95), loss=3.6, kl=0.6, seed=5,
               churn=[[s, 0.4] for s in range(1, 10)]),
        record("boom", factor(1, "lm_only"), status="failed"),
    ]
    # fmt: on


def test_bootstrap_interval_covers_a_planted_difference_and_excludes_zero():
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.70).astype(float)
    b = a.copy()
    flip = np.flatnonzero(a == 1)[:200]  # b loses 200 of a's correct items: exactly 10 points
    b[flip] = 0
    diff = stats.paired_ci(lambda m: 100 * (m["x"][..., 0] - m["x"][..., 1]), {"x": np.column_stack([a, b])})
    assert diff.value == pytest.approx(10.0)
    assert diff.low < 10 < diff.high and diff.excludes(0)
    assert diff.high - diff.low < 3.5  # paired: far tighter than two independent 2,000-item samples (~5.7)


def test_bootstrap_interval_includes_zero_without_a_difference():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    swap = rng.permutation(300)[:60]
    b[swap] = 1 - b[swap]  # as many flips each way, on average: no real difference
    diff = stats.paired_ci(lambda m: 100 * (m["x"][..., 0] - m["x"][..., 1]), {"x": np.column_stack([a, b])})
    assert not diff.excludes(0)


def test_mean_interval_of_sequences():
    e = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert e.value == 2.5 and 1.0 <= e.low < 2.5 < e.high <= 4.0
    assert not stats.mean_ci([1.0]).ok  # one sequence: no interval


def test_chance_normalization():
    means = {"four_way": np.array([0.4, 0.6]), "two_way": np.array([0.55, 0.7])}
    chance = {"four_way": 0.25, "two_way": 0.5}
    # above chance: variant 0.15 + 0.05 = 0.20, dense 0.35 + 0.20 = 0.55
    assert stats.chance_normalized(chance)(means) == pytest.approx(100 * 0.20 / 0.55)
    assert stats.chance_normalized(chance)({"four_way": np.array([0.25, 0.6])}) == pytest.approx(0.0)  # a guesser
    assert stats.maintenance(means) == pytest.approx(100 * 0.475 / 0.65)


def test_relative_maintenance_with_intervals(records):
    frame = trial_frame(records).set_index("trial_id")
    k1, k2 = frame.loc["k1"], frame.loc["k2"]
    dense_average = (7 * 0.6 + 0.25) / 8
    assert k1["maintenance_pct"] == pytest.approx(100 * 0.4 / dense_average)
    assert k1["maintenance_pct_lo"] < k1["maintenance_pct"] < k1["maintenance_pct_hi"] < 100  # clearly below dense
    assert k2["maintenance_pct_lo"] < k2["maintenance_pct"] < k2["maintenance_pct_hi"]
    assert k1["ffn_reduction_pct"] == pytest.approx(74.0)
    assert k1["arc_easy_maintenance_pct"] == pytest.approx(100 * 0.4 / 0.6)
    assert k1["heldout_loss"] == pytest.approx(6.0, abs=0.05) and k1["kl_from_dense"] == pytest.approx(2.5, abs=0.01)
    assert k1["delta_loss_vs_dense_lo"] > 2.9  # paired over the same sequences
    assert "boom" not in frame.index  # failed trials carry no numbers


def test_benchmarks_at_chance_are_left_out_of_chance_normalized_maintenance(records):
    above, at_chance = dense_above_chance(records[0], TASKS)
    assert at_chance == ["mmlu"] and len(above) == 7
    k1 = trial_frame(records).set_index("trial_id").loc["k1"]
    # over the 7 benchmarks above chance: sum(0.4 - c) / sum(0.6 - c)
    chance = [1 / CHOICES[t] for t in TASKS if t != "mmlu"]
    expected = 100 * sum(0.4 - c for c in chance) / sum(0.6 - c for c in chance)
    assert k1["cn_maintenance_pct"] == pytest.approx(expected)
    assert k1["cn_benchmarks"].split(",") == above and k1["dense_at_chance"] == "mmlu"


def test_missing_benchmark_leaves_average_and_maintenance_missing(records):
    frame = trial_frame(records).set_index("trial_id")
    assert math.isnan(frame.loc["k3", "mmlu"])
    assert math.isnan(frame.loc["k3", "average"]) and math.isnan(frame.loc["k3", "maintenance_pct"])
    assert frame.loc["k3", "arc_easy_maintenance_pct"] == pytest.approx(100 * 0.58 / 0.6)


def test_items_that_differ_are_never_paired(records):
    other = record("k2other", factor(2), scores=0.57, seed=2, loss=3.5, kl=0.5)
    assert not math.isnan(trial_frame(records[:1] + [other]).set_index("trial_id").loc["k2other", "maintenance_pct"])
    other["metrics"]["piqa"]["items"]["id"][0] = "9999"  # another sample of piqa
    frame = trial_frame(records[:1] + [other]).set_index("trial_id")
    assert math.isnan(frame.loc["k2other", "maintenance_pct"])


def test_pairs_that_differ_in_one_factor(records):
    pairs = pair_differences(records)
    by_factor = {(p["factor"], p["a"].split()[0], p["b"].split()[0], p["b"].split()[1]): p for _, p in pairs.iterrows()}
    assert ("top_k", "1R4E1K", "1R4E2K", "par") in by_factor
    assert ("router_mode", "1R4E2K", "1R4E2K", "random") in by_factor
    assert ("n_routers", "1R4E2K", "2R4E2K", "par") in by_factor
    assert len(pairs) == len(by_factor)
    rand = by_factor[("router_mode", "1R4E2K", "1R4E2K", "random")]
    assert rand["maintenance_diff_lo"] > 0 and rand["loss_diff"] == pytest.approx(-3.5, abs=0.05)
    assert "maintenance differs" in rand["verdict"]


def test_pareto_set(records):
    frame = trial_frame(records)
    front = set(frame[pareto_front(frame)]["trial_id"])
    # dense (100%), k1 (cheapest), k2 (best at 0.51 GF); k2rand and 2r are dominated by k2,
    # k3 has no maintenance (a benchmark is missing)
    assert front == {"dense", "k1", "k2"}


def test_failure_mode_flags_are_calibrated(records):
    frame = trial_frame(records)
    rows = frame.set_index("trial_id")
    flags = {tid: failure_flags(rows.loc[tid], frame) for tid in ("k1", "k2", "2r", "k3")}
    assert flags["k3"] == []  # attention 0.5/1.36 = 37%: below half
    assert flags["k1"] == [
        "load imbalance: 1R4E1K par busiest expert gets 2.5x the mean load",
        "attention bottleneck: attention is 58% of 1R4E1K par's FLOPs per token (dense: 31% at the same length)",
    ]
    assert flags["k2"] == [
        "no speed gained: 1R4E2K par saves 31% of total FLOPs but no round ran faster than dense (prefill x0.90-0.97)"
    ]
    assert any(
        f.startswith("router conflict: 2R4E2K par routers agree on 55% of top-K choices (chance 50%")
        for f in flags["2r"]
    )
    assert any(
        f.startswith(
            "expert collapse: 2R4E2K par experts' mean cosine similarity rose from 0.20 at "
            "factorization to 0.95 (random/frozen router: 0.50)"
        )
        for f in flags["2r"]
    )
    assert any(f.startswith("routing unstable late in training: 2R4E2K par churn 0.40") for f in flags["2r"])


def test_failed_and_missing_trials_are_listed_with_reasons(records):
    expected = [{"trial_id": "never", "label": "m 1R8E2K par contiguous 20000tok"}]  # TrialConfig.describe() (part)
    table = failed_trials(records, expected).set_index("trial_id")
    assert table.loc["boom", "reason"].startswith("NonFiniteLoss")
    assert table.loc["never", "status"] == "missing" and table.loc["never", "label"].startswith("m 1R8E2K")


def test_report_files(records, tmp_path):
    path = build_report(records, tmp_path, title="fixture")
    text = path.read_text()
    assert "## What this sweep shows" in text.split("## Main table")[0]
    assert "## Main table: m" in text and "hellaswag (acc_norm, chance 0.25)" in text and "mmlu †" in text
    assert re.search(
        r"\| 1R4E1K \| 25.0 \| par \| contiguous \| paper \| 20000 \| \d\.\d{3} \[\d", text
    )  # loss with CI
    assert "chance-norm. maint. %" in text and "KL(dense ‖ model)" in text
    assert "router conflict: 2R4E2K par routers agree on 55%" in text
    assert "NonFiniteLoss" in text
    for png in (
        "maintenance_vs_ffn_flops.png",
        "heldout_loss_vs_ffn_flops.png",
        "maintenance_vs_budget.png",
        "routing_churn.png",
        "expert_load.png",
    ):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    csv = (tmp_path / "trials.csv").read_text()
    assert "arc_easy_maintenance_pct" in csv.splitlines()[0] and "maintenance_pct_lo" in csv.splitlines()[0]
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_what_this_sweep_shows_states_only_supported_differences(records, tmp_path):
    text = build_report(records, tmp_path).read_text()
    shows = text.split("## What this sweep shows")[1].split("\n## ")[0]
    assert "1R4E1K par (contiguous, 20,000 tokens)" in shows and "(below the dense model)" in shows
    assert "On 1 of them (mmlu) its accuracy is not above chance" in shows
    checked = 0
    for claim in re.findall(r"not distinguishable \((-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", shows):
        assert float(claim[1]) <= 0 <= float(claim[2]), claim
        checked += 1
    for claim in re.findall(r"= (-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\][^(]*\(a (higher|lower)\)", shows):
        low, high = float(claim[1]), float(claim[2])
        assert (low > 0 and claim[3] == "higher") or (high < 0 and claim[3] == "lower"), claim
        checked += 1
    assert checked >= 8  # the fixture's pairs: 5 pairs, up to 2 claims each
    assert "1R4E2K random (contiguous, 20,000 tokens)" in shows and "below guessing" in shows


def test_a_corrupt_record_is_skipped_with_a_warning(records, tmp_path, caplog):
    import json

    for r in records[:2]:
        (tmp_path / r["trial_id"]).mkdir()
        (tmp_path / r["trial_id"] / "record.json").write_text(json.dumps(r))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "record.json").write_text('{"trial_id": "torn", "sta')
    loaded = load_records(tmp_path)
    assert [r["trial_id"] for r in loaded] == ["dense", "k1"]
    assert "torn/record.json" in caplog.text


def test_reports_need_nothing_from_harness():
    for path in Path("reports").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.split(".")[0] in ("harness", "factorllm_core", "torch")], path


def test_a_dense_model_at_chance_everywhere_is_said_plainly(tmp_path):
    guesser = {n: 1 / CHOICES[n] for n in TASKS}
    records = [record("dense", scores=guesser), record("k2", factor(2), scores=guesser, seed=2, loss=3.5, kl=0.5)]
    text = build_report(records, tmp_path).read_text()
    assert "On none of them is its accuracy above chance" in text
    k2 = trial_frame(records).set_index("trial_id").loc["k2"]
    assert math.isnan(k2["cn_maintenance_pct"]) and k2["cn_benchmarks"] == ""


def test_recipes_are_compared_with_the_paper_recipe_at_equal_width_and_budget(records, tmp_path):
    from reports.tables import recipe_comparison

    shared = {
        "n_experts": 3,
        "top_k": 1,
        "n_routers": 1,
        "router_mode": "par",
        "partition": "coact",
        "combine": "unscaled",
        "pseudo_label": "min_recon",
        "seed": 0,
        "n_shared": 1,
        "router_init": "fit",
    }
    best = record(
        "best",
        shared,
        scores={n: 0.59 for n in TASKS} | {"mmlu": 0.2},
        ffn=0.52,
        loss=3.2,
        kl=0.3,
        seed=9,
        train={"calibration_tokens": 4096},
    )
    assert best["recipe"] == "unscaled init=fit min_recon cal=4096"
    other_budget = record("b2", factor(2), loss=3.4, kl=0.4, budget=40000, seed=10)  # no paper trial at 40k
    rows = recipe_comparison(records + [best, other_budget])
    assert len(rows) == 1  # only `best` has a paper trial (k2) of the same width, budget, mode and seed
    row = rows.iloc[0]
    assert row["a"].startswith("1R3E1K1S par coact unscaled init=fit") and row["b"].startswith("1R4E2K par contiguous")
    assert row["active_pct"] == 50.0
    assert row["loss_diff"] == pytest.approx(-0.3, abs=0.05) and row["loss_diff_hi"] < 0
    assert "held-out loss differs" in row["verdict"]
    report = build_report(records + [best], tmp_path).read_text()
    assert "## Conversion recipes against the paper's" in report
    assert re.search(
        r"\| 50\.0 +\| 1R3E1K1S par coact unscaled init=fit min_recon cal=4096 20000tok lr=0\.001 +\| "
        r"1R4E2K par contiguous 20000tok lr=0\.001 +\| -0\.\d{3} \[-0\.\d{3}, -0\.\d{3}\]",
        report,
    )
    assert "| 1R3E1K1S | 50.0 | par | coact | unscaled init=fit min_recon cal=4096 | 20000 (4096) |" in report


def test_rebuilding_a_report_keeps_one_dense_baseline_per_evaluation(records, tmp_path):
    """The shared baselines folder holds dense trials of other sweeps too: reports.build
    must list one per evaluation setting of this sweep, not each of them."""
    import json

    from reports.build import main as build_main

    def write(folder, rec):
        (folder / rec["trial_id"]).mkdir(parents=True)
        (folder / rec["trial_id"] / "record.json").write_text(json.dumps(rec))

    sweep = tmp_path / "sweeps" / "s"
    dense = [r for r in records if not r["config"]["factor"]][0]
    twin = json.loads(json.dumps(dense)) | {"trial_id": "dense-twin", "finished_at": "2026-11-30T01:00:00+00:00"}
    elsewhere = json.loads(json.dumps(dense)) | {"trial_id": "dense-other"}
    elsewhere["config"]["eval"] = dict(elsewhere["config"]["eval"], limit=999)  # another sweep's setting
    for rec in (dense, twin, elsewhere):
        write(tmp_path / "sweeps" / "baselines" / "fp", rec)
    for rec in records:
        if rec["config"]["factor"]:
            write(sweep / "records", rec)
    assert build_main([str(sweep)]) == 0
    text = (sweep / "report" / "report.md").read_text()
    main_table = text.split("## Main table: m")[1].split("###")[0]
    assert main_table.count("| dense |") == 1


def test_served_speed_shows_beside_the_eager_one_when_measured(records, tmp_path):
    k1 = next(r for r in records if r["trial_id"] == "k1")
    k1["speedup"] |= {"decode": 1.05, "decode_rounds": [1.0, 1.05, 1.1]}
    k1["served"] = {
        "engine": "llama.cpp",
        "prefill": 1.4,
        "prefill_rounds": [1.38, 1.4, 1.45],
        "decode": 1.79,
        "decode_rounds": [1.75, 1.79, 1.8],
    }
    k2 = next(r for r in records if r["trial_id"] == "k2")
    k2["served"] = {"engine": "llama.cpp", "error": "1R4E2K cannot be exported as mixtral: ..."}
    text = build_report(records, tmp_path).read_text()
    table = text.split("## Main table: m")[1].split("###")[0]
    assert "| prefill x | decode x | served prefill x | served decode x |" in table
    assert "| 1.30 (1.20-1.40) | 1.05 (1.00-1.10) | 1.40 (1.38-1.45) | 1.79 (1.75-1.80) |" in table
    k2_row = next(line for line in table.splitlines() if "| 1R4E2K | 50.0 | par |" in line)
    assert k2_row.endswith("| n/a | n/a |")  # not exportable: no served numbers
    assert "- 1R4E2K paper: 1R4E2K cannot be exported as mixtral: ..." in text.split("No served speed (n/a above):")[1]
    without = build_report([r for r in records if r["trial_id"] not in ("k1", "k2")], tmp_path / "eager").read_text()
    assert "served prefill x |" not in without.split("## Main table: m")[1].split("###")[0]


def test_a_sweep_without_benchmarks_reports_held_out_measures(records, tmp_path):
    """eval.benchmarks: false leaves records without metrics: the report shows held-out loss and
    KL and says n/a for accuracy, instead of failing."""
    for r in records:
        r.pop("metrics", None)
        r["config"]["eval"]["benchmarks"] = False
    text = build_report(records, tmp_path).read_text()
    table = text.split("## Main table: m")[1].split("## ")[0]
    assert "| 1R4E2K | 50.0 | par | contiguous | paper | 20000 | 3.5" in table and "| n/a |" in table
    # it says there are no benchmark results, rather than that the dense model is at chance on them
    assert "has no benchmark results here (eval.benchmarks: false)" in text and "On none of them" not in text
    assert "### Per benchmark" not in text and "Setup: benchmarks off" in text


def test_records_from_before_an_option_existed_pair_over_its_default(records):
    """Review bug 1: a record written before router_bias existed lacks that factor; pairing it with a
    newer one raised KeyError or paired trials that differ in two factors as one."""
    import copy

    k2 = next(r for r in records if r["trial_id"] == "k2")
    old = copy.deepcopy(k2) | {"trial_id": "k2-old", "variant": "k2 (old record)"}
    del old["factors"]["router_bias"], old["factor_defaults"]  # as written before the option existed
    unbiased = copy.deepcopy(k2) | {"trial_id": "k2-nobias", "variant": "k2 bias=False"}
    unbiased["factors"]["router_bias"] = False
    both = copy.deepcopy(unbiased) | {"trial_id": "k2-nobias-kd", "variant": "k2 bias=False kd"}
    both["factors"]["lambda_kd"] = 1.0
    dense = next(r for r in records if r["trial_id"] == "dense")
    pairs = pair_differences([dense, old, unbiased, both])
    assert [(p.a, p.b, p.factor) for p in pairs.itertuples()] == [
        ("k2 (old record)", "k2 bias=False", "router_bias"),  # the old record had the default, True
        ("k2 bias=False", "k2 bias=False kd", "lambda_kd"),
    ]  # and old against both (two factors) is not a pair
    unknown = copy.deepcopy(old) | {"trial_id": "k2-unknown"}
    unknown["factors"]["new_option"] = 3  # a factor whose default no record declares
    assert pair_differences([dense, old, unknown]).empty  # not comparable, not a KeyError


def hostile_record(folder, case, good):
    """Put a hostile record.json at folder/record.json (issue 31's cases)."""
    import copy
    import json
    import os

    folder.mkdir(parents=True)
    path = folder / "record.json"
    if case == "fifo":
        os.mkfifo(path)
    elif case == "dev zero":
        path.symlink_to("/dev/zero")
    elif case == "200 MB":
        with open(path, "wb") as f:
            f.truncate(200 << 20)  # sparse: its size is what is refused, without reading it
    elif case == "nested 100k":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        rec = copy.deepcopy(good) | {"trial_id": folder.name}
        {
            "string number": lambda r: r.update(active_fraction="half"),
            "factor a string": lambda r: r["config"].update(factor="1R4E2K"),
            "model a list": lambda r: r["config"].update(model=["m"]),
            "factors null": lambda r: r.update(factors=None),
            "heldout strings": lambda r: r["heldout"].update(per_sequence_loss=["x"]),
        }[case](rec)
        path.write_text(json.dumps(rec))


HOSTILE_RECORDS = ["fifo", "dev zero", "200 MB", "nested 100k", "string number", "factor a string", "model a list",
                   "factors null", "heldout strings"]  # fmt: skip


def test_hostile_records_are_skipped_with_a_warning_naming_each(records, tmp_path, caplog):
    """One malformed record never kills the report, hangs it, or fills memory: it is left out
    and named (issue 31)."""
    import json
    import time

    from reports.build import main as build_main

    sweep = tmp_path / "s"
    for rec in records:
        (sweep / "records" / rec["trial_id"]).mkdir(parents=True)
        (sweep / "records" / rec["trial_id"] / "record.json").write_text(json.dumps(rec))
    k2 = next(r for r in records if r["trial_id"] == "k2")
    for case in HOSTILE_RECORDS:
        hostile_record(sweep / "records" / f"bad-{case.replace(' ', '-')}", case, k2)
    start = time.perf_counter()
    assert build_main([str(sweep)]) == 0
    assert time.perf_counter() - start < 60
    warned = [r.getMessage() for r in caplog.records if "unreadable record" in r.getMessage()]
    for case in HOSTILE_RECORDS:
        assert any(f"bad-{case.replace(' ', '-')}" in w for w in warned), case
    text = (sweep / "report" / "report.md").read_text()
    assert "| dense |" in text and "bad-" not in text.split("## Failed")[0]


@pytest.mark.parametrize(
    "manifest,message",
    [("{not json", "is not a sweep manifest"), ("[1, 2]", "title, records, expected, skipped missing"),
     ('{"title": "t", "expected": [], "skipped": []}', "records missing or of the wrong type"),
     ('{"title": "t", "records": {"a": 3}, "expected": [], "skipped": []}', "records (trial id -> path)")],
)  # fmt: skip
def test_a_broken_sweep_manifest_is_one_line_and_exit_2(tmp_path, capsys, manifest, message):
    from reports.build import main as build_main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(manifest)
    assert build_main([str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_record_written_after_an_eval_field_was_added_pairs_with_its_older_baseline(records):
    """Found on the extra-models sweep: a converted Gemma3 trial written after eval.heldout_documents
    existed was not paired with its dense baseline written before (loss - dense, maintenance, FLOPs
    cut all n/a)."""
    import copy

    k2 = copy.deepcopy(next(r for r in records if r["trial_id"] == "k2"))
    k2["config"]["eval"] = dict(k2["config"]["eval"], heldout_documents=0, benchmarks=True)
    dense = next(r for r in records if r["trial_id"] == "dense")
    assert "heldout_documents" not in dense["config"]["eval"]
    row = trial_frame([dense, k2]).set_index("trial_id").loc["k2"]
    assert not math.isnan(row["delta_loss_vs_dense"]) and not math.isnan(row["maintenance_pct"])
