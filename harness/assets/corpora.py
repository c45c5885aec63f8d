"""Text corpora for router training, with exact token budgets.

A corpus is a stream of documents. `token_budget(...)` tokenizes a corpus with
the model's tokenizer (cached per corpus and tokenizer), shuffles documents with
a seed, joins them with EOS and cuts exactly `budget_tokens` tokens, which
`pack` splits into fixed-length training sequences (the last may be shorter).

Corpus names:
- `enwiki-gensim` (default, offline): the shortened English Wikipedia dump that
  ships in gensim's wheel (install gensim with --no-deps; it is only read, never
  imported): ~100 main-namespace articles, markup stripped, ~0.5M words. The best
  general English prose found inside a PyPI package; far below the paper's 30-50M
  tokens, so offline runs use small budgets.
- `lee-news` (offline): gensim's Lee background corpus, 300 short Australian news
  stories (~60k words).
- a path to a .txt file (paragraphs split on blank lines), a .jsonl file (a "text"
  field per line) or a folder of such files.
- `hub:<dataset>[:<config>]`: a Hugging Face dataset streamed (e.g.
  `hub:DKYoon/SlimPajama-6B`), needs a network.
Never point a corpus at a benchmark's evaluation split.
"""

from __future__ import annotations

import bz2
import codecs
import hashlib
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from factorllm_core.registry import Registry
from harness.assets.cache import default_cache_root, prepare_cached

GENSIM_HINT = "pip install --no-deps gensim==4.4.0"


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: Callable[[], Iterator[str]]
    fingerprint: str  # changes when the text could differ
    cacheable: bool = True  # streamed hub corpora are not tokenized whole


CORPORA: Registry[Callable[[], Corpus]] = Registry("corpus")


def _gensim_data(filename: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the offline corpora need gensim's data files: {GENSIM_HINT}")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / filename


ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@CORPORA.register("enwiki-gensim")
def enwiki_gensim() -> Corpus:
    path = _gensim_data(ENWIKI_FILE)
    return Corpus("enwiki-gensim", lambda: wiki_articles(path), f"{ENWIKI_FILE}:{path.stat().st_size}")


@CORPORA.register("lee-news")
def lee_news() -> Corpus:
    path = _gensim_data("lee_background.cor")
    return Corpus("lee-news", lambda: iter(path.read_text().splitlines()), f"lee:{path.stat().st_size}")


def wiki_articles(path: Path) -> Iterator[str]:
    """Main-namespace, non-redirect articles of a MediaWiki XML dump, as plain text."""
    with bz2.open(path, "rb") as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            ns = element.find("./{*}ns")
            text = element.find("./{*}revision/{*}text")
            if (
                ns is not None
                and ns.text == "0"
                and text is not None
                and text.text
                and not text.text.lstrip().upper().startswith("#REDIRECT")
            ):
                plain = strip_wiki_markup(text.text)
                if plain:
                    yield plain
            element.clear()


_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)]
_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<math[^>]*>.*?</math>", re.S | re.I), ""),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]"), None),  # [[target|label]] -> label, below
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^[|!].*$", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
# Markup whose braces never balance (a template holding "{" or "}" as text): drop the line's rest.
_UNBALANCED = re.compile(r"(\{\{|\[\[(File|Image):|\{\||\[\[).*$", re.M)
_NON_PROSE_LINK = re.compile(r"^(File|Image|Category|[a-z]{2,3}(-[a-z]+)?):", re.I)


def _link(match: re.Match) -> str:
    whole = match.group(0)[2:-2]
    return "" if _NON_PROSE_LINK.match(whole) else match.group(1)


def strip_wiki_markup(text: str) -> str:
    """Wikitext -> plain prose: templates, tables, refs, files, categories and tags go."""
    for pattern in _NESTED:  # innermost first, until nothing nested is left
        while True:
            text, n = pattern.subn("", text)
            if n == 0:
                break
    for pattern, replacement in _SUBS:
        if replacement is None:
            for _ in range(3):  # links inside captions: innermost first
                text = pattern.sub(_link, text)
            text = re.sub(r"\[\[[^\]]*\]\]", "", text)  # leftovers (File: with nested links)
            text = _UNBALANCED.sub("", text)
        else:
            text = pattern.sub(replacement, text)
    return html.unescape(text).strip()


MAX_FOLDER_ENTRIES = 100_000  # a corpus folder holds documents, not a file system


def _corpus_files(path: Path) -> list[Path]:
    """The files a local corpus reads: the file itself, or a folder's .txt/.jsonl regular
    files (symlinks to devices are not regular files). A folder with more than
    MAX_FOLDER_ENTRIES entries below it (`/`, a home folder) is refused, not walked."""
    if not path.is_dir():
        return [path]
    files, seen = [], 0
    for folder, dirs, names in os.walk(path):
        seen += len(dirs) + len(names)
        if seen > MAX_FOLDER_ENTRIES:
            raise ValueError(
                f"corpus={str(path)!r}: the folder holds more than {MAX_FOLDER_ENTRIES:,} entries; "
                "give the folder that holds the corpus's .txt/.jsonl files"
            )
        files += [Path(folder, n) for n in names if Path(n).suffix in (".txt", ".jsonl")]
    return sorted(p for p in files if p.is_file())


TEXT_CHECK_BYTES = 1 << 16  # what validation reads of each file to tell text from binary


def _check_text(files: list[Path], spec: str) -> None:
    """Each file's first TEXT_CHECK_BYTES decode as UTF-8 (a multi-byte character cut at the
    end is allowed) and hold no NUL byte: a binary file is named here, before any trial. A
    corpus whose files are read whole and hold only whitespace (or nothing) is refused too:
    it would fail later, when the first batch found no tokens."""
    unseen = False  # some file is longer than what is read here: it may hold text further on
    any_text = False
    for file in files:
        with open(file, "rb") as f:
            head = f.read(TEXT_CHECK_BYTES)
            unseen = unseen or bool(f.read(1))
        any_text = any_text or bool(head.strip())
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            if b"\0" in head:
                raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
        except UnicodeDecodeError as error:
            raise ValueError(f"{file} is not UTF-8 text (byte {error.start}: {error.reason}); is it binary?") from None
    if not any_text and not unseen:
        raise ValueError(f"corpus={spec!r} holds no text (its files are empty or whitespace only)")


def _local_documents(path: Path) -> Iterator[str]:
    for file in _corpus_files(path):
        try:
            yield from _file_documents(file)
        except UnicodeDecodeError as error:  # past the part validation reads
            raise ValueError(f"{file} is not UTF-8 text (byte {error.start}: {error.reason}); is it binary?") from None


def _file_documents(file: Path) -> Iterator[str]:
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{file}:{line_number}: not a JSON row ({error.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{file}:{line_number}: JSONL rows need a 'text' field holding a string")
                    yield row["text"]
    else:
        yield from (p.strip() for p in re.split(r"\n\s*\n", file.read_text(encoding="utf-8")) if p.strip())


def _path_fingerprint(path: Path) -> str:
    """Changes when the text could differ: each file's name, size and modification time, and
    its first and last MB (bounded: a 10 GB corpus is not read whole to validate a grid)."""
    digest = hashlib.sha256()
    for file in _corpus_files(path):  # only what is read: a folder's other files change nothing
        stat = file.stat()
        digest.update(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if stat.st_size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _hub_corpus(spec: str) -> Corpus:
    dataset, _, config = spec.removeprefix("hub:").partition(":")

    def documents() -> Iterator[str]:
        import datasets

        stream = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
        for row in stream:
            yield row["text"]

    return Corpus(spec, documents, f"hub:{spec}", cacheable=False)


def resolve_corpus(spec: str) -> Corpus:
    """A registered name, a local .txt/.jsonl file or folder, or hub:<dataset>[:<config>]."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"corpus={spec!r} is empty; give a corpus name, a .txt/.jsonl path or hub:<dataset>")
    if spec.startswith("hub:"):
        return _hub_corpus(spec)
    if spec in CORPORA:
        return CORPORA.get(spec)()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path.is_file() or path.is_dir()):  # a device or a pipe would be read without end
            raise ValueError(f"corpus={spec!r} is not a regular file or folder (a device or a pipe?)")
        if path.is_file() and path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"corpus={spec!r}: local corpus files must be .txt or .jsonl")
        if path.is_dir() and not _corpus_files(path):
            raise ValueError(f"corpus={spec!r}: the folder holds no .txt or .jsonl file")
        _check_text(_corpus_files(path), spec)
        return Corpus(str(path), lambda: _local_documents(path), f"local:{_path_fingerprint(path)}")
    raise ValueError(
        f"corpus={spec!r} is not a known corpus ({', '.join(CORPORA.names())}), "
        f"an existing .txt/.jsonl path, or hub:<dataset>[:<config>]"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize_documents(documents: Iterator[str], tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per document (no special tokens); stops once `max_tokens` are collected."""
    out, total = [], 0
    batch: list[str] = []

    def flush():
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                out.append(ids)
                total += len(ids)
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) == 64:
            flush()
            if max_tokens is not None and total >= max_tokens:
                return out
    if batch:
        flush()
    return out


def _cached_tokens(corpus: Corpus, tokenizer, cache_dir: Path | None) -> list[list[int]]:
    root = Path(cache_dir) if cache_dir else default_cache_root()
    key = hashlib.sha256(f"{corpus.fingerprint}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
    target = root / "corpora" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', corpus.name)[-40:]}-{key}"

    def build(tmp: Path) -> None:
        docs = tokenize_documents(corpus.documents(), tokenizer)
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
        torch.save({"lengths": lengths, "tokens": flat}, tmp / "tokens.pt")

    prepare_cached(target, build)
    data = torch.load(target / "tokens.pt", weights_only=True)
    return [chunk.tolist() for chunk in torch.split(data["tokens"], data["lengths"].tolist())]


def token_budget(
    corpus: Corpus, tokenizer, budget_tokens: int, seed: int, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """Exactly `budget_tokens` token ids (1-D LongTensor): documents shuffled with `seed`,
    joined with EOS. Raises if the corpus holds fewer tokens than the budget."""
    if budget_tokens < 0:
        raise ValueError(f"data_budget_tokens={budget_tokens} must be >= 0")
    if budget_tokens == 0:
        return torch.zeros(0, dtype=torch.long)
    if corpus.cacheable:
        docs = _cached_tokens(corpus, tokenizer, cache_dir)
    else:
        docs = tokenize_documents(corpus.documents(), tokenizer, max_tokens=budget_tokens)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens: list[int] = []
    for index in order:
        tokens.extend(docs[index] + eos)
        if len(tokens) >= budget_tokens:
            return torch.tensor(tokens[:budget_tokens], dtype=torch.long)
    raise ValueError(
        f"data_budget_tokens={budget_tokens} exceeds corpus {corpus.name!r}, which holds "
        f"{len(tokens)} tokens with this tokenizer; lower the budget or use a larger corpus"
    )


def pack(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Split a token stream into sequences of `seq_len` (the last one may be shorter)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (next-token prediction)")
    return list(torch.split(tokens, seq_len))
