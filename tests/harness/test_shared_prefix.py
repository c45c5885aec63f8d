"""SharedPrefixLM gives HFLM's log-likelihoods (fp32, 1e-4) on every request shape the
eight benchmarks produce, and sends what it does not handle to HFLM's own path."""

import pytest
import torch
from conftest import TINY, make_tiny, make_word_tokenizer
from lm_eval.models.huggingface import HFLM
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from factorllm_core import FactorConfig, factorize
from harness.eval import packed_scoring
from harness.eval.benchmarks import TASK_SET, evaluate, make_lm
from harness.eval.packed_scoring import Group, pack
from harness.eval.shared_prefix import SharedPrefixLM

TOLERANCE = 1e-4


def random_tokens(generator, n):
    return torch.randint(3, TINY["vocab_size"], (n,), generator=generator).tolist()


def mixed_requests(seed=0):
    """The shapes the benchmarks produce, in one list: shared contexts with multi-token
    choices (ARC, HellaSwag, PIQA, OpenBookQA), shared contexts with one-token choices
    (MMLU, BoolQ), one context per choice with a shared continuation (Winogrande's
    partial scoring), a one-token context, and a repeated request."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for q in range(6):
        context = random_tokens(g, int(torch.randint(2, 40, (1,), generator=g)))
        for c in range(int(torch.randint(2, 5, (1,), generator=g))):
            requests.append(
                ((f"q{q}", f"c{c}"), context, random_tokens(g, int(torch.randint(1, 7, (1,), generator=g))))
            )
    for q in range(3):
        context = random_tokens(g, 30)
        requests += [((f"m{q}", f" {x}"), context, random_tokens(g, 1)) for x in "ABCD"]
    for q in range(3):
        ending = random_tokens(g, 5)
        requests += [((f"w{q}", str(o)), random_tokens(g, 10 + o), ending) for o in range(2)]
    requests.append((("one", "x"), random_tokens(g, 1), random_tokens(g, 3)))
    requests.append(requests[0])
    return requests


def both(model, requests, batch_size=3, row_tokens=48, tokenizer=None):
    tokenizer = tokenizer or make_word_tokenizer(["a b c"])
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    lm = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    lm.row_tokens = row_tokens  # small rows: several groups per row, and groups longer than a row
    return expected, lm._loglikelihood_tokens(requests, disable_tqdm=True), lm


def assert_same(expected, got):
    assert len(expected) == len(got)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(expected, got):
        assert ll_b == pytest.approx(ll_a, abs=TOLERANCE)
        assert greedy_a == greedy_b


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_matches_hflm_on_every_request_shape(family, attention):
    model = make_tiny(family)
    model.config._attn_implementation = attention  # eager takes the additive float mask
    requests = mixed_requests()
    expected, got, lm = both(model, requests)
    assert_same(expected, got)
    assert lm.paths == {"shared": len(requests)} and lm.hflm_reason is None


def test_matches_hflm_on_a_factorized_model():
    model = make_tiny("llama")
    factorize(model, FactorConfig(n_experts=4, top_k=2))
    expected, got, _ = both(model, mixed_requests(seed=1), batch_size=2)
    assert_same(expected, got)


def test_a_wrong_mask_would_be_caught(monkeypatch):
    """The parity test can fail: letting packed groups see each other changes the answers."""
    model = make_tiny("llama")
    requests = mixed_requests()
    expected, _, lm = both(model, requests)
    original = packed_scoring.packed_mask
    monkeypatch.setattr(
        packed_scoring,
        "packed_mask",
        lambda span, choice, *args: original(span.clamp(max=0).masked_fill(span < 0, -1), choice, *args),
    )
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) > 1e-2


def test_overlong_requests_and_rolling_take_hflms_path():
    model = make_tiny("llama")  # max_position_embeddings 128
    g = torch.Generator().manual_seed(3)
    long = (("long", "x"), random_tokens(g, 200), random_tokens(g, 3))  # HFLM truncates it from the left
    requests = mixed_requests() + [long]
    expected, got, lm = both(model, requests)
    assert_same(expected, got)
    assert lm.paths == {"shared": len(requests) - 1, "hflm": 1}
    rolling = [(None, random_tokens(g, 5), random_tokens(g, 4))]  # loglikelihood_rolling's windows
    assert_same(
        HFLM(pretrained=model, tokenizer=lm.tokenizer, batch_size=2, device="cpu")._loglikelihood_tokens(
            rolling, disable_tqdm=True
        ),
        lm._loglikelihood_tokens(rolling, disable_tqdm=True),
    )
    assert lm.paths["hflm"] == 2


def test_groups_longer_than_a_sliding_window_take_hflms_path():
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**TINY, head_dim=16, sliding_window=24)).eval()
    requests = mixed_requests()
    expected, got, lm = both(model, requests)
    assert_same(expected, got)
    assert lm.sliding_window == 24 and 0 < lm.paths["hflm"] < len(requests)


def test_unsupported_models_say_why_and_use_hflm():
    model = make_tiny("llama")
    model.config._attn_implementation = "flash_attention_2"  # ignores 4D masks: never called here
    lm = SharedPrefixLM(pretrained=model, tokenizer=make_word_tokenizer(["a"]), batch_size=2, device="cpu")
    assert "flash_attention_2" in lm.hflm_reason
    with pytest.raises(RuntimeError, match="cannot score packed rows with attention implementation"):
        lm.scorer.score_pairs([([5, 6], [7])], batch_size=1)  # the engine alone refuses too
    assert SharedPrefixLM(
        pretrained=make_tiny("llama"), tokenizer=lm.tokenizer, batch_size="auto", device="cpu"
    ).hflm_reason.startswith("batch_size")


def test_the_engine_scores_pairs_without_lm_eval():
    """packed_scoring alone (what the GPU check runs) against one forward per pair."""
    model = make_tiny("qwen2")
    pairs = [(context, continuation) for _, context, continuation in mixed_requests(seed=2)]
    scorer = packed_scoring.Scorer(model, torch.device("cpu"))
    seen = []
    got = scorer.score_pairs(pairs, batch_size=2, row_tokens=40, progress=seen.append)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation[:-1]])).logits[0, len(context) - 1 :]
        logprobs = torch.log_softmax(logits, -1)
        target = torch.tensor(continuation)
        assert ll == pytest.approx(float(logprobs[range(len(continuation)), target].sum()), abs=TOLERANCE)
        assert greedy == bool((logprobs.argmax(-1) == target).all())
    assert sorted(i for batch in seen for i in batch) == list(range(len(pairs)))
    assert scorer.work["head_positions"] < scorer.work["body_tokens"]
    with pytest.raises(ValueError, match="pair 0: empty context"):
        scorer.score_pairs([([], [1])], batch_size=1)


def test_packing_places_every_group_once_within_the_row_size():
    lengths = [300, 90, 80, 60, 50, 40, 30, 20, 10, 5, 5]
    groups = [Group(list(range(n)), [i], [[1]]) for i, n in enumerate(lengths)]
    rows = pack(groups, 100)
    placed = sorted(g.requests[0] for row in rows for g in row.groups)
    assert placed == list(range(len(lengths)))
    assert all(row.length <= 100 or len(row.groups) == 1 for row in rows)
    assert [row.length for row in rows] == sorted((row.length for row in rows), reverse=True)
    assert len(rows) == 5  # 300 | 90+10 | 80+20 | 60+40 | 50+30+5+5: best fit leaves no row half empty
    for row in rows:  # groups sit end to end from 0
        assert [g.start for g in row.groups] == [sum(x.length for x in row.groups[:k]) for k in range(len(row.groups))]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (no unknown tokens) trained on benchmark-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = [
        "Question: Which of these is a mammal?\nAnswer: the whale",
        "The man is washing a car. He then",
        "Passage: water boils at 100 degrees.\nQuestion: does water boil?\nAnswer: yes no",
        "The following are multiple choice questions (with answers) about biology. A. B. C. D. Answer:",
    ]
    backend.train_from_iterator(
        text * 20,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 4096})
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("name", TASK_SET)
def test_each_benchmark_through_lm_eval_matches_hflm(name, text_model):
    """Real tasks, real prompts, a random model: the same per-choice log-likelihoods and
    choices as HFLM, with every request on the shared path."""
    model, tokenizer = text_model
    results = {
        kind: evaluate(make_lm(kind, model, tokenizer, 4, "cpu"), [name], limit=4)[name] for kind in ("hflm", "shared")
    }
    hflm, shared = results["hflm"].items, results["shared"].items
    assert hflm["id"] == shared["id"] and hflm["pred"] == shared["pred"]
    for a, b in zip(hflm["lls"], shared["lls"]):
        assert b == pytest.approx(a, abs=TOLERANCE)
    assert results["shared"].lm_paths == {"shared": sum(shared["n_choices"])}
    assert results["hflm"].lm_paths is None
