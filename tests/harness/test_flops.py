import pytest
import torch

from factorllm_core import FactorConfig, factorize
from harness.measure.flops import count_flops

H, FFN, LAYERS, HEADS, KV_HEADS, T, VOCAB = 64, 96, 2, 4, 2, 32, 128


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))


def test_dense_counts_match_the_analytic_formula(tiny_model_factory, ids):
    flops = count_flops(tiny_model_factory("llama"), ids)
    head_dim = H // HEADS
    ffn = LAYERS * 3 * H * FFN  # gate, up, down: one MAC per weight per token
    projections = LAYERS * (2 * H * H + 2 * H * KV_HEADS * head_dim)  # q, o and the smaller k, v
    scores = LAYERS * 2 * T * H  # QK^T and AV over the full T x T matrix (eager)
    assert flops["ffn_gflops_per_token"] * 1e9 == pytest.approx(ffn, rel=1e-9)
    assert flops["attention_gflops_per_token"] * 1e9 == pytest.approx(projections + scores, rel=1e-9)
    assert flops["lm_head_gflops_per_token"] * 1e9 == pytest.approx(H * VOCAB, rel=1e-9)
    assert flops["other_gflops_per_token"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("top_k,n_routers", [(1, 1), (2, 1), (3, 2)])
def test_ffn_share_is_k_over_n_of_dense_plus_router(tiny_model_factory, ids, top_k, n_routers):
    model = tiny_model_factory("qwen2")
    dense = count_flops(model, ids)["ffn_gflops_per_token"]
    factorize(model, FactorConfig(n_experts=4, top_k=top_k, n_routers=n_routers))
    flops = count_flops(model, ids)
    router = LAYERS * H * 4 * n_routers / 1e9
    assert flops["ffn_gflops_per_token"] == pytest.approx(top_k / 4 * dense + router, rel=0.01)
    assert flops["attention_gflops_per_token"] == pytest.approx(count_flops(model, ids)["attention_gflops_per_token"])


def test_a_product_fvcore_cannot_count_stops_the_count(tiny_model_factory, ids, monkeypatch):
    """Without the addmm_ handle the in-place down projections would silently drop out
    of the FFN FLOPs; the count must fail instead, naming the op."""
    import harness.measure.flops as flops_module

    model = tiny_model_factory("qwen2")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    monkeypatch.setattr(flops_module, "EXTRA_HANDLES", {"aten::mm": flops_module.EXTRA_HANDLES["aten::mm"]})
    with pytest.raises(RuntimeError, match=r"no FLOP handle for \['aten::addmm_'\]"):
        count_flops(model, ids)


def test_dense_counts_are_cached_and_keyed_by_architecture(tiny_model_factory, tmp_path, monkeypatch):
    from harness.measure import flops as flops_module

    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model_factory("llama")
    first = flops_module.count_dense_flops_cached(model, ids, tmp_path)
    assert first == count_flops(model, ids)
    calls = []
    monkeypatch.setattr(flops_module, "count_flops", lambda m, i: calls.append(1) or count_flops(m, i))
    assert flops_module.count_dense_flops_cached(tiny_model_factory("llama", seed=3), ids, tmp_path) == first
    assert calls == []  # other weights, same architecture: read from the cache
    flops_module.count_dense_flops_cached(tiny_model_factory("qwen2"), ids, tmp_path)
    flops_module.count_dense_flops_cached(model, ids[:, :8], tmp_path)
    assert len(calls) == 2  # another architecture, other tokens: counted
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    with pytest.raises(ValueError, match="dense models only"):
        flops_module.count_dense_flops_cached(model, ids, tmp_path)


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_cpu_dispatch_path_counts_the_same_flops(tiny_model_factory, ids, top_k):
    """fvcore sees different ops per path (index_add loop, in-place addmm_, _grouped_mm);
    the count must not depend on which one ran. (`fused` runs Triton kernels that
    TorchScript cannot trace; it is inference-only and never counted.)"""
    from factorllm_core import use_dispatch

    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=top_k))
    counts = {}
    for path in ("reference", "sorted", "grouped"):
        with use_dispatch(model, path):
            counts[path] = count_flops(model, ids)
    assert counts["reference"] == counts["sorted"] == counts["grouped"]


@pytest.mark.parametrize("combine", ["unscaled", "mean_comp"])
def test_shared_experts_are_counted_in_the_ffn_flops(tiny_model_factory, ids, combine):
    """1R3E1K1S: one shared quarter of the neurons always runs plus one routed quarter:
    half the dense FFN plus the (3-way) router; the shared expert's FLOPs must show."""
    from factorllm_core import calibrate

    model = tiny_model_factory("llama")
    dense = count_flops(model, ids)["ffn_gflops_per_token"]
    calibration = calibrate(model, [ids[0]], "cpu")
    factorize(model, FactorConfig(n_experts=3, top_k=1, n_shared=1, combine=combine), calibration)
    flops = count_flops(model, ids)["ffn_gflops_per_token"]
    router = LAYERS * H * 3 / 1e9
    assert flops == pytest.approx(dense / 2 + router, rel=0.01)
    assert flops > dense / 4 + router * 1.5  # the routed expert alone would be a quarter
