"""Held-out measures: the token cut (within a model) and whole documents (the same text for
every tokenizer, with bits per byte)."""

import math

import pytest
import torch
from conftest import make_tiny, make_word_tokenizer

from harness.config import EvalConfig
from harness.eval.heldout import (
    as_batch,
    document_bytes,
    document_sequences,
    first_tokens,
    heldout_measures,
    heldout_sequences,
    next_token_logprobs,
)

DOCS = ["the cat sat on the mat", "a dog ran after the cat", "café owners sat down", "the end of it all"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return str(path)


def char_tokenizer():
    """A character-level tokenizer: the same text in many more tokens than the word one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(DOCS)))
    vocab = {c: i + 3 for i, c in enumerate(chars)} | {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def test_documents_are_the_same_text_for_every_tokenizer(text):
    config = EvalConfig(heldout_text=text, heldout_documents=3)
    words, chars = make_word_tokenizer(DOCS), char_tokenizer()
    by_word, by_char = document_sequences(words, config), document_sequences(chars, config)
    assert len(by_word) == len(by_char) == 3
    for w, c, doc in zip(by_word, by_char, DOCS):
        assert w[0] == words.eos_token_id and c[0] == chars.eos_token_id  # no BOS added: start from EOS
        assert len(c) - 1 == len(doc) and len(w) - 1 == len(doc.split())  # the whole document
    assert document_bytes(config) == [len(d.encode()) for d in DOCS[:3]]  # café: 5 bytes for its 4 characters


def test_bits_per_byte_is_total_nats_over_total_bytes(text):
    config = EvalConfig(heldout_text=text, heldout_documents=4)
    tokenizer = make_word_tokenizer(DOCS)
    model = make_tiny("llama")
    sequences = document_sequences(tokenizer, config)
    dense = next_token_logprobs(make_tiny("llama", seed=1), sequences, "cpu")
    result = heldout_measures(model, sequences, "cpu", dense, document_bytes(config))
    nats, kl_nats = 0.0, 0.0
    for row, reference in zip(sequences, dense):
        with torch.no_grad():
            logprobs = model(row[None]).logits[0, :-1].log_softmax(-1)
        nats -= float(logprobs.gather(1, row[1:, None]).sum())
        kl_nats += float((reference.exp() * (reference - logprobs)).sum())
    total_bytes = sum(len(d.encode()) for d in DOCS)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / total_bytes, rel=1e-5)
    assert result["kl_bits_per_byte"] == pytest.approx(kl_nats / math.log(2) / total_bytes, rel=1e-5)
    predicted = sum(len(row) - 1 for row in sequences)
    assert result["loss"] == pytest.approx(nats / predicted, rel=1e-5)  # per token, over all documents
    assert result["per_sequence_tokens"] == [len(row) - 1 for row in sequences]
    assert result["per_sequence_bytes"] == [len(d.encode()) for d in DOCS]


def test_the_token_cut_is_unchanged_and_carries_no_bytes(text):
    config = EvalConfig(heldout_text=text, heldout_tokens=8, heldout_seq_len=4)
    tokenizer = make_word_tokenizer(DOCS)
    sequences = heldout_sequences(tokenizer, config)
    assert isinstance(sequences, torch.Tensor) and sequences.shape == (2, 4)
    joined = [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert sequences.flatten().tolist() == joined[:8]
    result = heldout_measures(make_tiny("llama"), sequences, "cpu")
    assert result["seq_len"] == 4 and "bits_per_byte" not in result
    assert result["loss"] == pytest.approx(sum(result["per_sequence_loss"]) / 2)


@pytest.mark.parametrize("tokens,rows", [(512, 4), (500, 3), (100, 1), (10_000, 16)])
def test_the_slice_takes_whole_leading_sequences_as_before(tokens, rows):
    cut = torch.zeros(16, 128, dtype=torch.long)
    assert len(first_tokens(cut, tokens)) == rows == min(16, max(1, tokens // 128))
    documents = [torch.zeros(n, dtype=torch.long) for n in (300, 300, 300)]
    assert [len(d) for d in first_tokens(documents, 650)] == [300, 300]


def test_documents_longer_than_the_model_are_refused_not_cut(text):
    config = EvalConfig(heldout_text=text, heldout_documents=2)
    with pytest.raises(ValueError, match="document 0 of .* is 7 tokens, more than the model's 5"):
        document_sequences(make_word_tokenizer(DOCS), config, max_len=5)
    with pytest.raises(ValueError, match="holds 4 non-empty documents; eval.heldout_documents asks for 9"):
        document_sequences(make_word_tokenizer(DOCS), EvalConfig(heldout_text=text, heldout_documents=9))


def test_a_batch_for_checks_from_either_kind():
    cut = torch.arange(12).view(3, 4)
    assert torch.equal(as_batch(cut, 2), cut[:2])
    documents = [torch.arange(5), torch.arange(7)]
    assert as_batch(documents, 2, length=4).tolist() == [[0, 1, 2, 3], [4, 0, 1, 2]]
    assert as_batch(documents, None, length=4).shape == (3, 4)
