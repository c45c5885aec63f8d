"""One whole factorized trial through harness.trial, on the GPU when there is one.

    python perf/gpu_trial.py                 # auto device; TinyLlama widths, 4 layers
    python perf/gpu_trial.py --size tiny --device cpu    # the same path in seconds (CI)
    python perf/gpu_trial.py --recipe calibrated         # the calibrated conversion's paths

It runs what a sweep's GPU worker runs: load a checkpoint folder, factorize (1R4E2K,
PAR), train with bf16 autocast (precision auto: bf16 on CUDA), dispatch auto (grouped
on compute capability >= 9.0 in bf16), held-out loss and KL(dense || model), latency
with CUDA synchronisation, routing analysis and churn, one atomic record. The model is
a random Llama (TinyLlama's widths by default, 4 layers) with a word-level tokenizer,
trained on a generated text: the device image has torch and transformers but neither
lm-eval, fvcore, the benchmark data nor the packaged model, so benchmarks and FLOP
counting are off, and the FLOP/latency/churn probe is the generated text (in a sweep
it is HellaSwag contexts). Prints the record's summary; exit 1 unless the trial
completed with finite numbers.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness import trial as trial_module  # noqa: E402
from harness.config import TrialConfig  # noqa: E402
from harness.logs import setup_console  # noqa: E402
from harness.trial import Trial, summary_lines  # noqa: E402

SIZES = {  # LlamaConfig fields
    "tinyllama-4l": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us"
).split()


def make_assets(folder: Path, size: str, seed: int = 0) -> tuple[str, str, str]:
    """A random Llama checkpoint with a word-level tokenizer, a training text and a
    held-out text (different documents)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) for _ in range(400)]
    (folder / "train.txt").write_text("\n\n".join(docs[:300]))
    (folder / "heldout.txt").write_text("\n\n".join(docs[300:]))
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<pad>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **SIZES[size]))
    checkpoint = folder / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return str(checkpoint), str(folder / "train.txt"), str(folder / "heldout.txt")


# --recipe: the paper's 1R4E2K, or the calibrated conversion of experiments/recovery.yaml
# (calibration pass, coact split, a shared expert, fitted routers, a layer-wise stage and
# distillation from the dense model: every CUDA path those options add).
RECIPES = {
    "paper": ({"n_experts": 4, "top_k": 2, "router_mode": "par"}, {}),
    "calibrated": (
        {
            "n_experts": 3,
            "top_k": 1,
            "n_shared": 1,
            "combine": "unscaled",
            "partition": "coact",
            "router_init": "fit",
            "pseudo_label": "min_recon",
            "router_mode": "par",
            "router_bias": False,  # as the recovery grid trains it: exported exactly (harness/export/)
        },
        {"calibration_tokens": 2048, "layerwise_steps": 10, "lambda_kd": 1.0},
    ),
}


def trial_config(
    checkpoint: str, corpus: str, heldout: str, device: str, budget: int, recipe: str = "paper"
) -> TrialConfig:
    factor, train = RECIPES[recipe]
    return TrialConfig.from_dict(
        {
            "model": checkpoint,
            "device": device,
            "factor": factor,
            "train": {
                "data_budget_tokens": budget + train.get("calibration_tokens", 0),
                "corpus": corpus,
                "seq_len": 256,
                "batch_size": 4,
                "lr": 1e-3,
                "checkpoint_every": 0,
                "churn_points": 5,
                **train,
            },
            "eval": {"benchmarks": False, "heldout_text": heldout, "heldout_tokens": 1024, "heldout_seq_len": 128},
            "flops": {"enabled": False},
            "latency": {"batch_size": 4, "prefill_len": 512, "decode_tokens": 8, "repeats": 3, "warmup": 1},
        }
    )


def probe_from(path: str):
    """The probe text for this check: the training text's tokenizer applied to held-out docs."""

    def probe_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
        ids = tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens:
            ids = ids * (n_tokens // len(ids) + 1)
        return torch.tensor([ids[:n_tokens]], dtype=torch.long)

    return probe_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tinyllama-4l")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--budget", type=int, default=8192, help="training tokens")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="paper",
        help="paper: 1R4E2K; calibrated: the recovery recipe (+ layer-wise stage)",
    )
    parser.add_argument("--workdir", help="keep the model, texts and the trial's folder here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        checkpoint, corpus, heldout = make_assets(Path(tmp), args.size)
        config = trial_config(checkpoint, corpus, heldout, args.device, args.budget, args.recipe)
        trial_module.probe_tokens = probe_from(heldout)
        start = time.perf_counter()
        setup_console()
        trial = Trial(
            config,
            Path(tmp) / "runs",
            cache_dir=Path(tmp) / "cache",
            console_loggers=("harness.trial", "harness.train"),
        )
        record = trial.run()
        print("\n".join(summary_lines(record)))
        if record["status"] == "completed":
            dispatch = (record.get("latency") or {}).get("dispatch")
            print(
                f"  device {record['environment']['device']} ({record['environment'].get('gpu', 'no GPU')}), "
                f"precision {record['precision']}, latency dispatch {dispatch}, "
                f"train {record['training']['tokens_per_s']:.0f} tok/s, churn {record['training']['churn']['series']}"
            )
        print(f"whole trial: {record['status']} in {time.perf_counter() - start:.1f} s")
        if args.workdir:
            print(f"trial folder: {trial.dir}")
    return 0 if record["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
