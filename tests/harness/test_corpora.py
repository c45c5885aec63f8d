import pytest
import torch

from harness.assets.corpora import pack, resolve_corpus, strip_wiki_markup, token_budget

WORDS = "the cat sat on a mat while dogs ran far away from home".split()


@pytest.fixture
def text_corpus(tmp_path):
    paragraphs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + i % 7)) for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def test_budget_is_exact_and_deterministic_for_a_seed(text_corpus, word_tokenizer, cache_dir):
    tokenizer = word_tokenizer(WORDS)
    corpus = resolve_corpus(str(text_corpus))
    a = token_budget(corpus, tokenizer, 123, seed=0)
    b = token_budget(corpus, tokenizer, 123, seed=0)
    c = token_budget(corpus, tokenizer, 123, seed=1)
    assert a.shape == (123,) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a == tokenizer.eos_token_id).sum() > 5  # documents are joined with EOS
    assert token_budget(corpus, tokenizer, 0, seed=0).numel() == 0
    assert any((cache_dir / "corpora").iterdir())  # tokenized once, cached


def test_budget_larger_than_corpus_is_an_error(text_corpus, word_tokenizer, cache_dir):
    with pytest.raises(ValueError, match=r"data_budget_tokens=100000 exceeds corpus"):
        token_budget(resolve_corpus(str(text_corpus)), word_tokenizer(WORDS), 100_000, seed=0)


def test_pack_splits_into_fixed_length_sequences():
    sequences = pack(torch.arange(10), 4)
    assert [s.tolist() for s in sequences] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="seq_len=1"):
        pack(torch.arange(10), 1)


def test_jsonl_corpus_needs_a_text_field(tmp_path, word_tokenizer, cache_dir):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "the cat"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: JSONL rows need a 'text' field"):
        token_budget(resolve_corpus(str(path)), word_tokenizer(WORDS), 10, seed=0)


def test_unknown_corpus_lists_the_choices():
    with pytest.raises(ValueError, match=r"corpus='wikitext' is not a known corpus \(enwiki-gensim, lee-news\)"):
        resolve_corpus("wikitext")


def test_wiki_markup_is_stripped():
    text = (
        "'''Alan''' was a [[mathematician|scientist]] from {{Country|UK}}.<ref>Source</ref>\n"
        "== Life ==\n* Born in [[London]].\n[[File:Alan.jpg|thumb|A [[photo]]]]\n"
        "{| class=wikitable\n| cell\n|}\n[[Category:People]]"
    )
    assert strip_wiki_markup(text) == "Alan was a scientist from .\nLife\nBorn in London."


def test_offline_default_corpus_is_real_english(word_tokenizer):
    docs = list(resolve_corpus("enwiki-gensim").documents())
    assert len(docs) > 100
    assert sum(len(d.split()) for d in docs) > 400_000
    assert not any("{{" in d or "[[" in d for d in docs)


def test_a_binary_corpus_is_named_whether_its_binary_part_is_read_at_validation_or_later(tmp_path):
    from harness.assets.corpora import TEXT_CHECK_BYTES, resolve_corpus

    early = tmp_path / "early.txt"
    early.write_bytes(b"text\n\x00\xff binary")
    with pytest.raises(ValueError, match=f"{early} is not UTF-8 text"):
        resolve_corpus(str(early))
    late = tmp_path / "late.txt"  # text for longer than validation reads, then bytes that are not UTF-8
    late.write_bytes(b"word " * (TEXT_CHECK_BYTES // 5 + 10) + b"\xff\xfe")
    corpus = resolve_corpus(str(late))
    with pytest.raises(ValueError, match=f"{late} is not UTF-8 text"):
        list(corpus.documents())
