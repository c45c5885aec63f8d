"""Tiny sweep assets shared by the sweep and cluster tests: a random Llama checkpoint
with a word tokenizer, a small corpus, and a grid file over them."""

from pathlib import Path

import torch
import yaml

WORDS = (
    "the a cat dog sat ran on in mat house big small red blue one two and or but so man woman is was he she it they"
).split()


def make_assets(folder: Path) -> Path:
    import conftest

    conftest.make_tiny("llama").save_pretrained(folder / "ckpt")
    conftest.make_word_tokenizer(WORDS).save_pretrained(folder / "ckpt")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(40)]
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    return folder


def write_grid(path: Path, assets: Path, storage: Path, budgets, repeats: int = 1) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "storage": str(storage),
                "device": "cpu",
                "axes": {
                    "model": [str(assets / "ckpt")],
                    "n_experts": [4],
                    "top_k": [2],
                    "data_budget_tokens": budgets,
                },
                "train": {"corpus": str(assets / "corpus.txt"), "seq_len": 32, "batch_size": 2, "lr": 1e-3},
                "eval": {"tasks": ["arc_easy"], "limit": 1},
                "flops": {"seq_len": 32},
                "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": repeats, "warmup": 0},
                "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
                "failure": {"max_failures": 0},
            }
        )
    )
    return path


def trial_config(folder, data_budget_tokens: int = 300) -> dict:
    """A tiny trial over the sweep tests' assets: no benchmarks, no FLOPs."""
    assets = make_assets(folder)
    (assets / "heldout.txt").write_text((assets / "corpus.txt").read_text())
    train = {
        "data_budget_tokens": data_budget_tokens,
        "corpus": str(assets / "corpus.txt"),
        "seq_len": 32,
        "batch_size": 2,
        "lr": 1e-3,
    }
    heldout = {"heldout_text": str(assets / "heldout.txt"), "heldout_tokens": 64, "heldout_seq_len": 32}
    return {
        "model": str(assets / "ckpt"),
        "device": "cpu",
        "train": train,
        "eval": {"benchmarks": False} | heldout,
        "flops": {"enabled": False},
    }
