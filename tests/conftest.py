"""Tiny random models built from configs: no download, a second or less each."""

import os
import shutil
import tempfile

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# fmt: off
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# fmt: on

# a calibrated recipe with every calibrated option: shared expert, coact, mean_comp, fitted routers
# fmt: off
CALIBRATED = {"n_experts": 3, "top_k": 1, "n_shared": 1, "combine": "mean_comp", "partition": "coact",
              "router_init": "fit", "pseudo_label": "min_recon"}
# fmt: on


def with_attention_biases(model):
    """Random q/k/v biases: a random model's start at zero, where code that dropped them (or an
    export that did not permute them with the weights) would go unnoticed."""
    for name, parameter in model.named_parameters():
        if name.endswith("_proj.bias") and ".self_attn." in name:
            parameter.data.normal_()
    return model


# Shaped like the packaged models at toy size: Qwen2.5 (q/k/v biases, untied head, as its GGUF
# loads), Gemma3 (GELU-tanh gated FFN, four norms per layer, a sliding-attention layer beside a
# full-attention one, query_pre_attn_scalar, tied embedding; test_shared_prefix narrows the window).
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: with_attention_biases(Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False))),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **TINY,
            head_dim=16,
            sliding_window=64,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    ),
}


def make_tiny(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def pytest_configure(config):
    """The whole session, and every process it starts (Ray workers, CLIs), caches models,
    corpora and FLOP counts in a temporary folder, never in the user's ~/.cache."""
    folder = tempfile.mkdtemp(prefix="factorllm-test-cache-")
    os.environ["FACTORLLM_CACHE"] = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_model_factory():
    return make_tiny


@pytest.fixture
def token_ids():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network: hub libraries must fail at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def make_word_tokenizer(texts, vocab_size: int = 128):
    """A real (tiny) fast tokenizer trained on `texts`: word-level, with EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<pad>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture
def word_tokenizer():
    return make_word_tokenizer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
