"""The fast dispatch against the plain reference loop: outputs and gradients."""

import pytest
import torch
from dispatch_cases import make_experts, routing

from factorllm_core import DISPATCH

FAST_PATHS = ("sorted", "grouped")


@pytest.mark.parametrize("fast", FAST_PATHS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("skip_expert", [None, 2])
def test_fast_paths_equal_reference_forward_and_backward(fast, top_k, skip_expert):
    outputs, grads = {}, {}
    for name in ("reference", fast):
        experts = make_experts(top_k=top_k)
        x = torch.randn(37, 48, generator=torch.Generator().manual_seed(5), requires_grad=True)
        indices, weights = routing(37, 4, top_k, skip_expert=skip_expert)
        weights.requires_grad_(True)
        out = DISPATCH.get(name)(experts, x, indices, weights)
        (out * torch.linspace(-1, 1, 48)).sum().backward()
        outputs[name] = out.detach()
        grads[name] = [x.grad, weights.grad] + [p.grad for p in experts.parameters()]
    torch.testing.assert_close(outputs[fast], outputs["reference"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[fast], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ("reference",) + FAST_PATHS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_every_path_takes_zero_tokens(path, top_k, grad):
    experts = make_experts(top_k=top_k)
    x = torch.randn(0, 48, requires_grad=grad)
    indices, weights = routing(0, 4, top_k)
    with torch.set_grad_enabled(grad):
        out = DISPATCH.get(path)(experts, x, indices, weights)
    assert out.shape == (0, 48)


@pytest.mark.parametrize("fast", FAST_PATHS)
@pytest.mark.parametrize("top_k", [1, 3])
def test_fast_paths_equal_reference_in_inference(fast, top_k):
    """Under no_grad `sorted` works in place on its gathered copy; x must stay intact."""
    experts = make_experts(top_k=top_k)
    x = torch.randn(53, 48, generator=torch.Generator().manual_seed(7))
    x_before = x.clone()
    indices, weights = routing(53, 4, top_k, skip_expert=0)
    with torch.no_grad():
        expected = DISPATCH.get("reference")(experts, x, indices, weights)
        got = DISPATCH.get(fast)(experts, x, indices, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("top_k", [1, 2])
def test_training_keeps_each_experts_slots_in_token_order(top_k):
    """Weight gradients sum over an expert's rows, so their rounding follows the row
    order: training sorts stably, so a trained result does not depend on the sort
    (at 4,096 slots the unstable CPU sort, used at inference, reorders them)."""
    from factorllm_core.experts import SortedSlots

    indices = torch.randint(0, 4, (4096, top_k), generator=torch.Generator().manual_seed(0))

    def in_token_order(slots):
        expert_of = indices.reshape(-1)[slots.order]
        return all(bool((slots.token_of[expert_of == e].diff() >= 0).all()) for e in range(4))

    with torch.enable_grad():
        assert in_token_order(SortedSlots.of(indices, None, 4))


def test_in_place_expert_forward_refuses_autograd():
    experts = make_experts()
    x = torch.randn(4, 48)
    with pytest.raises(RuntimeError, match="inference only"):
        experts.expert_forward(0, x, out=torch.empty(4, 48))


def test_grouped_biases_match_reference():
    experts = make_experts(top_k=2)
    g = torch.Generator().manual_seed(3)
    experts.gate_bias = torch.nn.Parameter(torch.randn(4, experts.expert_width, generator=g))
    experts.up_bias = torch.nn.Parameter(torch.randn(4, experts.expert_width, generator=g))
    x = torch.randn(29, 48, generator=g)
    indices, weights = routing(29, 4, 2)
    with torch.no_grad():
        expected = DISPATCH.get("reference")(experts, x, indices, weights)
        for fast in FAST_PATHS:
            torch.testing.assert_close(DISPATCH.get(fast)(experts, x, indices, weights), expected, rtol=1e-5, atol=1e-6)


def test_grouped_never_reads_device_data_on_the_host():
    """On the meta device tensors have no data: any `.tolist()`, `.item()`,
    `nonzero` or data-dependent shape fails. `grouped` must run there, so on a GPU
    it makes no host synchronisation; `sorted` and `reference` do (and fail)."""
    experts = make_experts(top_k=2).to("meta", torch.bfloat16)  # the GPU dtype
    x = torch.empty(64, 48, device="meta", dtype=torch.bfloat16)
    indices = torch.empty(64, 2, dtype=torch.long, device="meta")
    weights = torch.empty(64, 2, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        out = DISPATCH.get("grouped")(experts, x, indices, weights)
        assert out.shape == (64, 48) and out.device.type == "meta"
        for host_syncing in ("sorted", "reference"):
            with pytest.raises((RuntimeError, NotImplementedError)):
                DISPATCH.get(host_syncing)(experts, x, indices, weights)


def test_auto_picks_by_device_and_dtype(monkeypatch):
    from factorllm_core.experts import auto_dispatch

    assert auto_dispatch(torch.zeros(2, 2), torch.float32) == "sorted"
    assert auto_dispatch(torch.zeros(2, 2, dtype=torch.bfloat16), torch.bfloat16) == "sorted"  # CPU

    class CudaTensor:  # what auto_dispatch reads of a CUDA tensor
        is_cuda, device = True, "cuda:0"

        def __init__(self, dtype):
            self.dtype = dtype

    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability["value"])
    assert auto_dispatch(CudaTensor(torch.bfloat16), torch.bfloat16) == "grouped"
    assert auto_dispatch(CudaTensor(torch.bfloat16), torch.float32) == "sorted"  # autocast, fp32 weights
    assert auto_dispatch(CudaTensor(torch.float16), torch.float16) == "sorted"
    capability["value"] = (8, 0)  # A100: no grouped GEMM in torch for it
    assert auto_dispatch(CudaTensor(torch.bfloat16), torch.bfloat16) == "sorted"


def test_auto_falls_back_with_a_reason_when_torch_has_no_grouped_gemm(monkeypatch, caplog):
    from factorllm_core import experts

    class CudaTensor:
        is_cuda, device, dtype = True, "cuda:0", torch.bfloat16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(experts, "has_grouped_mm", lambda: False)  # an older torch
    experts._log_once.cache_clear()
    assert experts.auto_dispatch(CudaTensor(), torch.bfloat16) == "sorted"
    assert "no torch._grouped_mm; using `sorted`" in caplog.text


def test_auto_uses_the_fast_path_and_reference_stays_selectable(monkeypatch):
    experts = make_experts()
    calls = []
    monkeypatch.setitem(DISPATCH._items, "sorted", lambda *a: calls.append("sorted") or a[1])
    experts(torch.zeros(3, 48), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert calls == ["sorted"]
    experts.dispatch = "reference"
    experts(torch.zeros(3, 48), torch.tensor([[0, 1]] * 3), torch.ones(3, 2))
    assert calls == ["sorted"]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sorted_inference_in_cache_blocks_equals_reference(top_k, monkeypatch):
    """CPU inference splits the tokens into blocks; force 5 uneven ones (53 tokens)."""
    import factorllm_core.experts as experts_module

    monkeypatch.setattr(experts_module, "CPU_BLOCK_BYTES", -(-53 * top_k * 48 * 4 // 5))  # 5 blocks
    experts = make_experts(top_k=top_k)
    x = torch.randn(53, 48, generator=torch.Generator().manual_seed(11))
    indices, weights = routing(53, 4, top_k, skip_expert=1)
    calls = []
    original = experts_module._sorted_block
    monkeypatch.setattr(experts_module, "_sorted_block", lambda e, xb, *a: calls.append(len(xb)) or original(e, xb, *a))
    with torch.no_grad():
        expected = DISPATCH.get("reference")(experts, x, indices, weights)
        got = DISPATCH.get("sorted")(experts, x, indices, weights)
    assert calls == [11, 11, 11, 11, 9]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sorted_inference_folds_a_uniform_combine_weight_into_the_down_gemm(top_k, monkeypatch):
    """The `scaled` combine gives every slot N/K: passed as a float (alpha of the down
    GEMM), not multiplied into the hidden states; random weights stay per-row tensors."""
    experts = make_experts(top_k=top_k)
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(3))
    indices, random_weights = routing(40, 4, top_k)
    scales = []
    original = experts.expert_forward
    monkeypatch.setattr(
        experts,
        "expert_forward",
        lambda e, part, scale=None, out=None: scales.append(scale) or original(e, part, scale, out=out),
    )
    for weights, scale_type in ((torch.full((40, top_k), 4 / top_k), float), (random_weights, torch.Tensor)):
        with torch.no_grad():
            expected = DISPATCH.get("reference")(experts, x, indices, weights)
            scales.clear()
            got = DISPATCH.get("sorted")(experts, x, indices, weights)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert len(scales) == 4 and all(isinstance(s, scale_type) for s in scales)


def test_sorted_inference_with_an_activation_it_cannot_apply_in_place():
    experts = make_experts(top_k=2)
    experts.act_fn = torch.nn.GELU()
    x = torch.randn(30, 48, generator=torch.Generator().manual_seed(5))
    indices, weights = routing(30, 4, 2)
    with torch.no_grad():
        expected = DISPATCH.get("reference")(experts, x, indices, weights)
        got = DISPATCH.get("sorted")(experts, x, indices, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_tokens,top_k", [(1, 1), (1, 2), (1, 3), (3, 3), (5, 2), (16, 1)])
@pytest.mark.parametrize("uniform", [True, False])
def test_sorted_decode_sized_inference_skips_the_sort_and_equals_reference(n_tokens, top_k, uniform, monkeypatch):
    """At <= DECODE_SLOTS (token, slot) pairs inference runs each chosen expert directly;
    one pair more goes back to the sorted blocks."""
    import factorllm_core.experts as experts_module

    experts = make_experts(top_k=top_k)
    x = torch.randn(n_tokens, 48, generator=torch.Generator().manual_seed(n_tokens))
    indices, weights = routing(n_tokens, 4, top_k)
    if uniform:
        weights = torch.full_like(weights, 4 / top_k)
    blocks = []
    original = experts_module._sorted_block
    monkeypatch.setattr(experts_module, "_sorted_block", lambda *a: blocks.append(1) or original(*a))
    with torch.no_grad():
        expected = DISPATCH.get("reference")(experts, x, indices, weights)
        got = DISPATCH.get("sorted")(experts, x, indices, weights)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert blocks == []
        x_more = torch.randn(17, 48)
        indices_more, weights_more = routing(17, 4, 1)
        torch.testing.assert_close(
            DISPATCH.get("sorted")(experts, x_more, indices_more, weights_more),
            DISPATCH.get("reference")(experts, x_more, indices_more, weights_more),
            rtol=1e-5,
            atol=1e-6,
        )
        assert blocks == [1]


def test_use_dispatch_sets_every_layer_and_restores_them(tiny_model_factory):
    from factorllm_core import FactorConfig, factorize, factorized_layers, use_dispatch

    model = tiny_model_factory("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    layers = [layer for _, layer in factorized_layers(model)]
    layers[0].experts.dispatch = "reference"
    with use_dispatch(model, "grouped"):
        assert [layer.experts.dispatch for layer in layers] == ["grouped"] * len(layers)
    assert [layer.experts.dispatch for layer in layers] == ["reference"] + ["auto"] * (len(layers) - 1)
    with pytest.raises(ValueError, match="fast"):
        with use_dispatch(model, "fast"):
            pass
    assert layers[1].experts.dispatch == "auto"
