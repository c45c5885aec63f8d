"""The report from a fixture of records: numbers, Pareto set, flags, failures."""

import math
import re

import pytest

from harness.benchmarks import BENCHMARKS, TASK_SET
from reports.build import build_report
from reports.tables import failed_trials, failure_flags, pareto_front, trial_frame

EVAL = {"tasks": list(TASK_SET), "limit": 40, "num_fewshot": 0, "source": "local", "batch_size": 16}


def record(trial_id, factor=None, scores=0.5, ffn=1.0, attention=0.5, budget=20000, routing=None,
           speedup=None, status="completed", drop=()):
    scores = scores if isinstance(scores, dict) else {n: scores for n in TASK_SET}
    metrics = {n: {"name": n, "metric": BENCHMARKS.get(n).metric, "value": v, "stderr": 0.05, "n": 40,
                   "seconds": 1.0, "metrics": {}} for n, v in scores.items() if n not in drop}
    rec = {"trial_id": trial_id, "label": trial_id, "status": status, "error": None,
           "config": {"model": "m", "factor": factor, "seed": 0, "eval": EVAL,
                      "train": {"data_budget_tokens": budget}},
           "metrics": metrics, "flops": {"attention_gflops_per_token": attention, "ffn_gflops_per_token": ffn,
                                          "total_gflops_per_token": attention + ffn + 0.1},
           "speedup": speedup, "routing": routing}
    if status != "completed":
        rec.update(error="NonFiniteLoss: non-finite loss at optimizer step 3", metrics=None, flops=None)
    return rec


def factor(k, mode="par", n=4, r=1):
    return {"n_experts": n, "top_k": k, "n_routers": r, "router_mode": mode, "partition": "contiguous"}


def routing(similarity=0.2, agreement=None, imbalance=1.2, layers=None):
    return {"summary": {"expert_similarity": similarity, "router_agreement": agreement,
                        "load_max_over_mean": imbalance, "routing_entropy_normalized": 0.9},
            "layers": layers or [{"expert_load": [10, 20, 30, 40]}, {"expert_load": [25, 25, 25, 25]}]}


@pytest.fixture
def records():
    return [
        record("dense", scores=0.5, ffn=1.0),
        record("k1", factor(1), scores=0.4, ffn=0.26, routing=routing(imbalance=2.5), speedup={"prefill": 1.3}),
        record("k2", factor(2), scores=0.45, ffn=0.51, routing=routing()),
        record("k2rand", factor(2, "random"), scores=0.3, ffn=0.51, routing=routing()),
        record("k3", factor(3), scores={n: 0.48 for n in TASK_SET}, ffn=0.76, routing=routing(),
               drop=("mmlu",)),  # a missing benchmark
        record("2r", factor(2, r=2), scores=0.44, ffn=0.52, attention=0.9, routing=routing(agreement=0.41,
                                                                                            similarity=0.95)),
        record("boom", factor(1, "lm_only"), status="failed"),
    ]


def test_relative_maintenance_and_reductions(records):
    frame = trial_frame(records).set_index("trial_id")
    assert frame.loc["k1", "maintenance_pct"] == pytest.approx(80.0)
    assert frame.loc["k2", "maintenance_pct"] == pytest.approx(90.0)
    assert frame.loc["k1", "ffn_reduction_pct"] == pytest.approx(74.0)
    assert frame.loc["k1", "total_reduction_pct"] == pytest.approx(100 * (1 - 0.86 / 1.6))
    assert frame.loc["k1", "arc_easy_maintenance_pct"] == pytest.approx(80.0)
    assert frame.loc["dense", "average"] == pytest.approx(0.5)
    assert "boom" not in frame.index  # failed trials carry no numbers


def test_missing_benchmark_leaves_average_and_maintenance_missing(records):
    frame = trial_frame(records).set_index("trial_id")
    assert math.isnan(frame.loc["k3", "mmlu"])
    assert math.isnan(frame.loc["k3", "average"]) and math.isnan(frame.loc["k3", "maintenance_pct"])
    assert frame.loc["k3", "arc_easy_maintenance_pct"] == pytest.approx(96.0)


def test_pareto_set(records):
    frame = trial_frame(records)
    front = set(frame[pareto_front(frame)]["trial_id"])
    # dense (100%), k1 (cheapest), k2 (best at 0.51 GF); k2rand and 2r are dominated by k2,
    # k3 has no maintenance (a benchmark is missing)
    assert front == {"dense", "k1", "k2"}


def test_failure_mode_flags(records):
    frame = trial_frame(records).set_index("trial_id")
    flags = {tid: failure_flags(frame.loc[tid]) for tid in ("k1", "k2", "2r")}
    assert flags["k2"] == []
    assert flags["k1"] == ["load imbalance: 1R4E1K par busiest expert gets 2.5x the mean load",
                           "attention bottleneck: attention is 58% of 1R4E1K par's FLOPs per token"]
    assert "router conflict: 2R4E2K par routers agree on 41% of top-K choices" in flags["2r"]
    assert any(f.startswith("expert collapse: 2R4E2K par") for f in flags["2r"])
    assert any(f.startswith("attention bottleneck: attention is 59% of 2R4E2K par") for f in flags["2r"])


def test_failed_and_missing_trials_are_listed_with_reasons(records):
    expected = [{"trial_id": "never", "model": "m", "factor": factor(2, n=8)}]
    table = failed_trials(records, expected).set_index("trial_id")
    assert table.loc["boom", "reason"].startswith("NonFiniteLoss")
    assert table.loc["never", "status"] == "missing"


def test_report_files(records, tmp_path):
    path = build_report(records, tmp_path, title="fixture")
    text = path.read_text()
    assert "## Main table: m" in text and "hellaswag (acc_norm)" in text and "boolq (acc)" in text
    assert "| 1R4E1K | par | contiguous | 20000 |" in text
    assert "80.0" in text and "router conflict: 2R4E2K par routers agree on 41%" in text
    assert "NonFiniteLoss" in text
    for png in ("maintenance_vs_ffn_flops.png", "maintenance_vs_budget.png", "expert_load.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    csv = (tmp_path / "trials.csv").read_text()
    assert "arc_easy_maintenance_pct" in csv.splitlines()[0]
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
