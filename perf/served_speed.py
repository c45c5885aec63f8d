"""Served speed: dense against exported FactorLLM variants in llama.cpp, after checking
that llama.cpp computes what transformers computes.

    python perf/served_speed.py runs/sweeps/served/records/<trial_id> ... --quant f16 --threads 2

Needs the llama.cpp extra (FACTORLLM_SERVE=1 bash install.sh). For each trial: the exact
export (harness/export/), then GGUF through llama.cpp's own converter; the dense source
model goes through the same converter with the same tensor type, so both sides are the
same kind of file. Then:
  1. parity: per-token log-probabilities on the trial's held-out text, llama.cpp (f32 KV
     cache; the median with the default f16 cache is shown beside) against transformers
     (fp32, the exported folder): the median absolute difference within the
     tolerance for the tensor type (harness/serve.py), with the mean, the max and the share
     of tokens off by more than 0.1 nats (near-tie routing) beside it; and greedy
     continuations of a few prompts, llama.cpp against transformers, token for token;
  2. timing: prefill tokens/s of a 512-token prompt and decode tokens/s over 128 tokens,
     every model in every round (interleaved, after one untimed warm-up each), the same
     thread count for all; medians with the range over rounds, and each variant's speed
     over the dense model's in the same round.
Ideal decode speedup from bytes of weights read per token (the embedding table is read
one row per token; the tied output matrix in full): printed beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import serve  # noqa: E402
from harness.export import export  # noqa: E402
from harness.trial_folder import heldout_ids, load_trial  # noqa: E402

PROMPTS = ["The capital of France is", "In 1998, the company announced", "Water boils at a temperature of"]


def transformers_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = model.float().eval()(ids[None]).logits[0].float().log_softmax(-1)
    return logp[torch.arange(len(ids) - 1), ids[1:]]


def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    out, ids = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def parity(model, engine, path: Path, ids: torch.Tensor, tokenizer, quant: str) -> dict:
    """The engine's per-token log-probabilities and greedy continuations against transformers'
    (fp32). For llama.cpp, with an f32 KV cache (the default f16 cache's median beside it)."""
    theirs = transformers_logprobs(model, ids).double()
    n_ctx = max(512, len(ids) + 32)
    served_median = None
    if engine.name == "llama.cpp":
        served = engine.load(path, n_ctx, logits_all=True)  # the f16 KV cache timed
        served_median = serve.parity(engine.module.token_logprobs(served, ids.tolist()), theirs.numpy())
        served_median = served_median["median_abs_logprob_diff"]
        del served
    llm = engine.load(path, n_ctx, logits_all=True, kv_f32=True, quant=quant)
    ours = torch.tensor(engine.module.token_logprobs(llm, ids.tolist()))
    same = 0
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        same += engine.module.greedy(llm, prompt_ids, 16) == transformers_greedy(model, prompt_ids, 16)
    del llm
    check = serve.parity(ours.numpy(), theirs.numpy())
    tolerance = engine.module.LOGPROB_TOLERANCE[quant]
    return check | {
        "tolerance": tolerance,
        "ok": check["median_abs_logprob_diff"] <= tolerance,
        "greedy_identical": f"{same}/{len(PROMPTS)}",
        "median_with_f16_kv_cache": served_median,
    }


class Engine:
    """llama.cpp (GGUF files from llama.cpp's converter) or vLLM (the exported folders)."""

    def __init__(self, name: str, threads: int, n_models: int = 1):
        self.name, self.threads, self.n_models = name, threads, n_models
        if name == "vllm":
            from harness import serve_vllm

            self.module = serve_vllm
        else:
            self.module = serve

    def check(self) -> None:
        if self.name == "vllm":
            self.module.engine_class()
        else:
            serve.llama_class(), serve.llama_cpp_source()

    def file(self, hf: Path, folder: Path, quant: str) -> Path:
        """What the engine loads for `quant`: a GGUF converted once into `folder`, or the folder."""
        if self.name == "vllm":
            return hf
        gguf = folder / f"model-{quant}.gguf"
        if not gguf.exists():
            folder.mkdir(parents=True, exist_ok=True)
            serve.convert_to_gguf(hf, quant, gguf)
        return gguf

    def load(self, path: Path, n_ctx: int, logits_all: bool = False, kv_f32: bool = False, quant: str = "f16"):
        if self.name == "vllm":
            return self.module.load(path, quant, self.n_models, n_ctx)
        return serve.load(path, self.threads, n_ctx=n_ctx, logits_all=logits_all, kv_f32=kv_f32)


def weight_bytes_per_token(cfg, active_ffn: float) -> float:
    """Bytes of weights a decode step reads at 2 bytes per weight: every non-FFN matrix, the
    active share of the FFN, one embedding row (the tied LM head is read in full)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    attention = layers * (2 * h * h + 2 * h * kv)
    ffn = layers * 3 * h * cfg.intermediate_size * active_ffn
    return 2 * (attention + ffn + cfg.vocab_size * h + h)


def prepare(trials: list[str], out: Path, quant: str, engine: Engine) -> list[dict]:
    """Export every trial (and convert it for the engine) and the dense source; check parity
    of each, at f32 (the engine computes the exported model) and at the timed tensor type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.assets.models import load_model

    models = []
    for path in trials:
        model, tokenizer, record = load_trial(path)
        folder = out / record["trial_id"]
        hf = folder / "hf"
        if not (hf / "factorllm_export.json").exists():
            export(model, tokenizer, heldout_ids(tokenizer, record, 2048), hf)
        name = f"{record['setting']} {record['recipe'] or 'paper'}".strip()
        exported = json.loads((hf / "factorllm_export.json").read_text())
        models.append({"name": name, "folder": folder, "hf": hf, "record": record, "tokenizer": tokenizer,
                       "export": exported, "active_ffn": record["active_fraction"]})  # fmt: skip
    source = json.loads((Path(trials[0]) / "model" / "source.json").read_text())
    dense = load_model(source["name"], dtype=torch.float32, device="cpu")
    dense_entry = {"name": "dense", "folder": out / "dense", "hf": Path(dense.source.location), "export": None}
    models.insert(0, dense_entry | {"record": models[0]["record"], "tokenizer": dense.tokenizer, "active_ffn": 1.0})
    dense_config = AutoConfig.from_pretrained(models[0]["hf"])
    for m in models:
        m["file"] = engine.file(m["hf"], m["folder"], quant)
        hf_model = AutoModelForCausalLM.from_pretrained(m["hf"], dtype=torch.float32)
        ids = heldout_ids(m["tokenizer"], m["record"], 2048).flatten()[:256]
        m["parity"] = parity(hf_model, engine, m["file"], ids, m["tokenizer"], quant)
        exact = engine.file(m["hf"], m["folder"], "f32")  # the engine itself, without weight rounding
        m["parity_f32"] = parity(hf_model, engine, exact, ids, m["tokenizer"], "f32")
        print(f"parity {m['name']} (f32): {m['parity_f32']}", flush=True)
        print(f"parity {m['name']} ({quant}): {m['parity']}", flush=True)
        m["ideal_bytes"] = weight_bytes_per_token(dense_config, m["active_ffn"])
    models[0]["quarter_bytes"] = weight_bytes_per_token(dense_config, 0.25)
    return models


def time_all(models: list[dict], engine: Engine, quant: str, rounds: int, prefill: int, decode: int) -> None:
    """Interleaved rounds: every model once per round, in the same order."""
    ids = heldout_ids(models[0]["tokenizer"], models[0]["record"], 2048, sequences=None).flatten().tolist()
    prompt, steps = ids[:prefill], ids[prefill : prefill + decode]
    if len(steps) < decode:
        raise ValueError(f"the held-out text has {len(ids)} tokens; {prefill + decode} are needed")
    contexts = [engine.load(m["file"], prefill + decode + 8, quant=quant) for m in models]
    for llm in contexts:
        engine.module.time_once(llm, prompt[:64], steps[:8])  # warm-up
    for m in models:
        m["rounds"] = []
    for _ in range(rounds):
        for m, llm in zip(models, contexts):
            m["rounds"].append(engine.module.time_once(llm, prompt, steps))


def table(models: list[dict], quant: str, engine: Engine) -> str:
    dense = models[0]
    where = (
        f"vLLM {engine.module.version()}, batch 1"
        if engine.name == "vllm"
        else f"llama.cpp (llama-cpp-python {serve.LLAMA_CPP_VERSION}), {engine.threads} threads"
    )
    lines = [
        f"{where}, {quant}, {len(dense['rounds'])} interleaved rounds; medians [min, max]",
        "",
        f"| model | active FFN | exact export | logprob Δ median at f32 | logprob Δ median / mean / max at {quant} "
        "(tol.), share > 0.1 | median, f16 KV | greedy same | prefill tok/s | decode tok/s | prefill x dense | "
        "decode x dense | decode x dense, empty context | ideal decode x |",
        "|---|---:|---|---|---|---|---|---|---|---|---|---|---:|",
    ]
    for m in models:
        pre = [r.prefill_tokens_per_s for r in m["rounds"]]
        dec = [r.decode_tokens_per_s for r in m["rounds"]]
        pre_x = [r.prefill_tokens_per_s / d.prefill_tokens_per_s for r, d in zip(m["rounds"], dense["rounds"])]
        dec_x = [r.decode_tokens_per_s / d.decode_tokens_per_s for r, d in zip(m["rounds"], dense["rounds"])]
        empty_x = [
            r.decode_empty_tokens_per_s / d.decode_empty_tokens_per_s for r, d in zip(m["rounds"], dense["rounds"])
        ]
        p = m["parity"]
        exact = "-" if m["export"] is None else ("yes" if m["export"]["exact"] else "no")
        lines.append(
            f"| {m['name']} | {m['active_ffn']:.0%} | {exact} | {m['parity_f32']['median_abs_logprob_diff']:.1e} | "
            f"{'' if p['ok'] else 'NOT MET: '}{p['median_abs_logprob_diff']:.4f} / "
            f"{p['mean_abs_logprob_diff']:.4f} / {p['max_abs_logprob_diff']:.2f} ({p['tolerance']}), "
            f"{p['share_above_0.1']:.1%} | {_maybe(p['median_with_f16_kv_cache'])} | {p['greedy_identical']} | "
            f"{_spread(pre, 0)} | "
            f"{_spread(dec, 1)} | {_spread(pre_x, 2)} | {_spread(dec_x, 2)} | {_spread(empty_x, 2)} | "
            f"{dense['ideal_bytes'] / m['ideal_bytes']:.2f} |"
        )
    return "\n".join(lines + ["", fixed_cost(models)])


def fixed_cost(models: list[dict]) -> str:
    """Where the decode time goes: a least-squares line through (weight bytes per token, ms per
    decoded token) over all models, from an empty context. The slope is the cost of reading
    and multiplying weights; the intercept is what every step pays whatever the FFN's size
    (graph build, thread barriers between ops, the Python call, copying the logits out). The
    ceiling is the speedup a 25%-active FFN could reach with that intercept."""
    if len({m["ideal_bytes"] for m in models}) < 2:
        return "(one weight size only: no fixed-cost fit)"
    x = [m["ideal_bytes"] / 1e6 for m in models]
    y = [1e3 / statistics.median(r.decode_empty_tokens_per_s for r in m["rounds"]) for m in models]
    fit = statistics.linear_regression(x, y)
    dense_ms, dense_mb = y[0], x[0]  # models[0] is the dense one
    quarter = models[0]["quarter_bytes"] / 1e6
    residual = max(abs(fit.slope * a + fit.intercept - b) for a, b in zip(x, y))
    return (
        f"Decode from an empty context, ms per token against MB of weights read per token (least squares over "
        f"{len(x)} models, worst residual {residual:.2f} ms): {fit.slope * 1e3:.1f} µs per MB read, and a fixed "
        f"{fit.intercept:.2f} ms per token ({fit.intercept / dense_ms:.0%} of the dense step) that no FFN "
        f"reduction removes. With that fixed cost, 25% active FFN can reach at most "
        f"{dense_ms / (fit.slope * quarter + fit.intercept):.2f}x (ideal by bytes alone: {dense_mb / quarter:.2f}x)."
    )


def _maybe(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trials", nargs="+", help="completed trial folders (<records>/<trial_id>)")
    parser.add_argument("--out", default="runs/served", help="exports and GGUF files go here (reused)")
    parser.add_argument("--engine", default="llama.cpp", choices=["llama.cpp", "vllm"])
    parser.add_argument("--quant", default="f16", help="llama.cpp: f16, q8_0; vllm: f16, bf16")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (vLLM: unused)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    args = parser.parse_args(argv)
    engine = Engine(args.engine, args.threads, n_models=len(args.trials) + 1)
    if args.quant not in engine.module.LOGPROB_TOLERANCE:
        parser.error(f"--quant {args.quant}: {args.engine} takes {', '.join(sorted(engine.module.LOGPROB_TOLERANCE))}")
    try:
        engine.check()
    except (serve.ServeUnavailable, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = prepare(args.trials, Path(args.out), args.quant, engine)
    bad = [m["name"] for m in models if not m["parity_f32"]["ok"]]
    if bad:  # at f32 weights (and KV cache) the engine must compute the exported model
        print(f"error: {args.engine} does not compute what transformers computes for {', '.join(bad)}: not timed",
              file=sys.stderr)  # fmt: skip
        return 1
    for m in models:
        if not m["parity"]["ok"]:
            print(
                f"note: {m['name']} at {args.quant}: rounding the weights moves its log-probabilities by a median "
                f"{m['parity']['median_abs_logprob_diff']:.3f} nats (> {m['parity']['tolerance']}); timed, and "
                "marked in the table",
                file=sys.stderr,
            )
    time_all(models, engine, args.quant, args.rounds, args.prefill, args.decode)
    text = table(models, args.quant, engine)
    print(text)
    suffix = "" if args.engine == "llama.cpp" else "-vllm"
    Path(args.out, f"served_speed-{args.quant}{suffix}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
