"""A trained factorized model out of the harness: a stock Hugging Face MoE class, and GGUF.

    python -m harness.export runs/sweeps/default/records/<trial_id> --out exported/1r3e1k1s
    python -m harness.export <trial dir or record.json> --out DIR --arch mixtral|qwen2_moe|granitemoeshared
    python -m harness.export <trial> --out DIR --format gguf --quant q8_0   # needs FACTORLLM_SERVE=1 bash install.sh

The folder (config.json, safetensors, tokenizer) loads with stock transformers,
`AutoModelForCausalLM.from_pretrained(DIR)`: no custom code, no `auto_map`. Each target
class computes, per token, softmax router probabilities, the top-K experts and their
renormalised probabilities as weights (Mixtral; Qwen2-MoE with `norm_topk_prob`;
GraniteMoeShared as a softmax over the top-K logits, the same numbers). A FactorLLM layer
maps onto that exactly when it has one router without a bias and no per-expert mean
compensation, and its combine rule is
  - `weighted` (renormalised probabilities x N: N folds into the down projections), any K;
  - a constant (`scaled`: N/K, `unscaled`: 1) at K = 1, where the renormalised weight is 1;
  - anything at K = N, where every expert runs: the router is zeroed, each weight is 1/N.
Shared experts become GraniteMoeShared's shared MLP (weight 1) or Qwen2-MoE's shared
expert, whose zero gate gives sigmoid(0) = 0.5, so its down projection is doubled.
A Qwen2 source (q/k/v biases) goes to GraniteMoeShared with `attention_bias` (o's bias
zero), which llama.cpp runs: llama.cpp computes Qwen2-MoE's shared-expert gate as
silu(x) / x (src/models/qwen2moe.cpp), 0/0 = NaN at the zero gate an exact export needs,
so `--arch qwen2_moe` is for transformers and vLLM only and refused with `--format gguf`.
Before anything is written the export's logits are compared with the factorized model's
on held-out text (fp32): an exact mapping must agree within 1e-4, or within twice the
rounding by which the factorized model's own two implementations (reference and sorted
dispatch) differ where that is larger (`rounding_floor`), or nothing is written.
Everything else is refused in one line naming the option that would make it exportable;
`--approximate` exports a constant combine at 1 < K < N anyway (router logits scaled by
2^-10, so the renormalised weights are nearly 1/K) and reports its measured error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.utils.logging import disable_progress_bar

from factorllm_core import COMBINES, FactorConfig, factorized_layers, load_trained_ffns, use_dispatch
from factorllm_core.factorize import FACTOR_CONFIG_FILE
from factorllm_core.registry import Registry
from harness.assets.cache import file_lock
from harness.logs import setup_console
from reports.record import RECORD_FILE, output_problem, read_record

log = logging.getLogger("harness.export")  # by name: this module also runs as __main__

EXACT_TOLERANCE = 1e-4  # max |logit difference| of an exact export, fp32
APPROXIMATE_ROUTER_SCALE = 2.0**-10  # a power of two: scaling keeps every logit's order exactly


class NotExportable(ValueError):
    """The model cannot be written as the asked class; the message says why and what would."""


@dataclass(frozen=True)
class Layer:
    """One factorized FFN, as tensors a stock MoE layer takes."""

    router: torch.Tensor  # (N, H), already scaled or zeroed as the mapping needs
    gate: torch.Tensor  # (N, W, H)
    up: torch.Tensor  # (N, W, H)
    down: torch.Tensor  # (N, H, W), the combine's constant folded in
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate (S, H), up (S, H), down (H, S)


@dataclass(frozen=True)
class Target:
    """A stock MoE class: its config from the source's, and where each tensor goes."""

    config: object  # (source config, N, K, W, S) -> transformers config
    tensors: object  # (layer index, Layer, source config) -> {state dict key: tensor}
    shared: str  # "none" | "optional" | "required": what it does with shared experts
    attention_bias: bool  # can carry the source's q/k/v biases
    gguf_problem: str | None = None  # why llama.cpp cannot run this class as exported, if it cannot


TARGETS: Registry[Target] = Registry("export architecture")


def _common(source, n_experts: int, top_k: int) -> dict:
    """The settings every target copies from the dense source."""
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return {k: getattr(source, k) for k in keys} | {
        "head_dim": _head_dim(source),
        "num_experts_per_tok": top_k,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _head_dim(source) -> int:
    return getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads


def _mixtral_config(source, n, k, width, shared):
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common(source, n, k),
        intermediate_size=width,
        num_local_experts=n,
        sliding_window=None,
        router_jitter_noise=0.0,
    )


def _routed(prefix: str, router: str, layer: Layer) -> dict:
    """The router and the routed experts, gate and up fused, as transformers 5 stores them."""
    return {prefix + router: layer.router, prefix + "experts.gate_up_proj": torch.cat([layer.gate, layer.up], 1),
            prefix + "experts.down_proj": layer.down}  # fmt: skip


def _mixtral_tensors(i: int, layer: Layer, source) -> dict:
    return _routed(f"model.layers.{i}.mlp.", "gate.weight", layer)


def _granite_config(source, n, k, width, shared):
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(
        **_common(source, n, k),
        intermediate_size=width,
        num_local_experts=n,
        shared_intermediate_size=shared,
        attention_bias=_has_qkv_bias(source),
        # identity multipliers; attention_multiplier replaces 1/sqrt(head_dim)
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_multiplier=1.0 / math.sqrt(_head_dim(source)),
    )


def _granite_tensors(i: int, layer: Layer, source) -> dict:
    p = f"model.layers.{i}."
    out = _routed(p + "block_sparse_moe.", "router.weight", layer)
    if layer.shared is not None:
        gate, up, down = layer.shared
        out |= {
            p + "shared_mlp.input_linear.weight": torch.cat([gate, up]),
            p + "shared_mlp.output_linear.weight": down,
        }
    if _has_qkv_bias(source) and not _has_o_bias(source):  # Qwen2: q/k/v biases, none on o (Granite's covers all four)
        out[p + "self_attn.o_proj.bias"] = torch.zeros(source.hidden_size)
    return out


def _qwen2_moe_config(source, n, k, width, shared):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(source, n, k),
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=n,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        use_sliding_window=False,
    )


def _qwen2_moe_tensors(i: int, layer: Layer, source) -> dict:
    p = f"model.layers.{i}."
    out = _routed(p + "mlp.", "gate.weight", layer)
    out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, source.hidden_size)  # sigmoid(0) = 0.5
    gate, up, down = (
        layer.shared
        if layer.shared is not None
        else (torch.zeros(0, source.hidden_size),) * 2 + (torch.zeros(source.hidden_size, 0),)
    )
    out |= {
        p + "mlp.shared_expert.gate_proj.weight": gate,
        p + "mlp.shared_expert.up_proj.weight": up,
        p + "mlp.shared_expert.down_proj.weight": 2 * down,
    }
    if not _has_qkv_bias(source):  # a Llama source: the class always has q/k/v biases; zeros keep it exact
        kv = source.num_key_value_heads * _head_dim(source)
        out |= {
            p + "self_attn.q_proj.bias": torch.zeros(source.num_attention_heads * _head_dim(source)),
            p + "self_attn.k_proj.bias": torch.zeros(kv),
            p + "self_attn.v_proj.bias": torch.zeros(kv),
        }
    return out


TARGETS.register("mixtral")(Target(_mixtral_config, _mixtral_tensors, shared="none", attention_bias=False))
TARGETS.register("granitemoeshared")(Target(_granite_config, _granite_tensors, shared="optional", attention_bias=True))
TARGETS.register("qwen2_moe")(
    Target(
        _qwen2_moe_config,
        _qwen2_moe_tensors,
        shared="optional",
        attention_bias=True,
        gguf_problem="llama.cpp computes Qwen2-MoE's shared-expert gate as silu(x)/x (src/models/qwen2moe.cpp), "
        "0/0 = NaN at the zero gate this exact export writes: use --arch granitemoeshared for llama.cpp",
    )
)


def _has_qkv_bias(source) -> bool:
    return bool(getattr(source, "attention_bias", False)) or getattr(source, "model_type", "") == "qwen2"


def _has_o_bias(source) -> bool:
    """Llama's attention_bias puts a bias on all four projections; Qwen2's o has none."""
    return getattr(source, "model_type", "") == "llama" and bool(getattr(source, "attention_bias", False))


def pick_arch(arch: str, factor: FactorConfig, architecture: str) -> str:
    """`auto`: Mixtral for a Llama source without shared experts, GraniteMoeShared with them
    and for a Qwen2 source (its q/k/v biases as Granite's attention biases); llama.cpp runs both."""
    if arch != "auto":
        TARGETS.get(arch, "--arch")
        return arch
    if architecture == "Qwen2ForCausalLM":
        return "granitemoeshared"
    return "granitemoeshared" if factor.n_shared else "mixtral"


def gguf_problem(arch: str) -> str | None:
    """Why llama.cpp cannot run `arch` as this module exports it (None: it can)."""
    return TARGETS.get(arch, "--arch").gguf_problem


def factor_problems(factor: FactorConfig, arch: str, approximate: bool) -> list[str]:
    """Why a model of this factor config cannot be written as `arch`, each with the option that
    would allow it (known from the config alone, before any weights are loaded)."""
    out = []
    if factor.router_mode == "random":
        out.append(
            "router_mode random picks experts at random: there is no router to export; train a router "
            "(router_mode par or lm_only)"
        )
    if factor.n_routers > 1:
        out.append(f"n_routers={factor.n_routers}: stock classes have one router per layer; use n_routers: 1")
    if factor.router_bias:
        out.append("the router has a bias, which stock classes do not: train with factor.router_bias: false")
    if COMBINES.get(factor.combine).add_unchosen_mean:
        out.append(
            f"combine {factor.combine} adds each unchosen expert's mean output, which no stock class "
            "does: use combine unscaled"
        )
    if _constant(factor) and 1 < factor.top_k < factor.n_experts and not approximate:
        out.append(
            f"combine {factor.combine} weighs each chosen expert by a constant, which stock classes "
            f"(renormalised probabilities) match only at K = 1 or K = N, not K = {factor.top_k}: use "
            "combine weighted, or --approximate"
        )
    if factor.n_shared and TARGETS.get(arch).shared == "none":
        out.append(f"{arch} has no shared expert: use --arch granitemoeshared or qwen2_moe")
    return out


def source_problems(source, arch: str, has_ffn_bias: bool) -> list[str]:
    """Why the dense source model's layers cannot be written as `arch`."""
    model_type = getattr(source, "model_type", "?")
    if model_type not in ("llama", "qwen2"):
        return [
            f"the source model is {model_type}: only Llama and Qwen2 models map to stock MoE classes "
            f"({', '.join(TARGETS.names())}); Gemma3 and others have no stock MoE counterpart"
        ]
    out = []
    if _has_qkv_bias(source) and not TARGETS.get(arch).attention_bias:
        out.append(f"the source's attention has q/k/v biases, which {arch} lacks: use --arch granitemoeshared")
    elif _has_o_bias(source) and arch == "qwen2_moe":
        out.append("the source's o projection has a bias, which qwen2_moe lacks: use --arch granitemoeshared")
    if getattr(source, "mlp_bias", False) or has_ffn_bias:
        out.append("the FFN has biases, which stock MoE experts lack")
    if getattr(source, "use_sliding_window", False):
        out.append("the source uses sliding-window attention; the export would not")
    return out


def _constant(factor: FactorConfig) -> bool:
    """Whether the combine rule weighs every chosen expert the same."""
    return factor.combine != "weighted"


def layer_tensors(ffn, factor: FactorConfig, approximate: bool) -> Layer:
    """One factorized FFN as stock-MoE tensors (see the module docstring for the mapping)."""
    n, k = factor.n_experts, factor.top_k
    experts = ffn.experts
    router = ffn.router.gate.weight.detach().float()
    constant = COMBINES.get(factor.combine).uniform_weight(n, k)  # N/K for scaled, 1 for unscaled, N for weighted
    if not _constant(factor):
        scale = float(n)  # renormalised p x N: N into the down projections
    elif k == n:
        router, scale = torch.zeros_like(router), constant * n  # every expert runs: weights 1/N
    elif k == 1:
        scale = constant  # the renormalised weight is exactly 1
    else:  # --approximate: tiny logits, weights ~1/K
        router, scale = router * APPROXIMATE_ROUTER_SCALE, constant * k
    shared = None
    if ffn.shared is not None:
        s = ffn.shared
        shared = (s.gate_weight[0].detach().float(), s.up_weight[0].detach().float(), s.down_weight[0].detach().float())
    return Layer(
        router,
        experts.gate_weight.detach().float(),
        experts.up_weight.detach().float(),
        experts.down_weight.detach().float() * scale,
        shared,
    )


def to_stock(model: nn.Module, arch: str = "auto", approximate: bool = False) -> nn.Module:
    """A stock transformers MoE model computing what the factorized `model` computes."""
    from transformers import AutoModelForCausalLM

    layers = factorized_layers(model)
    factor, source = layers[0][1].config, model.config
    arch = pick_arch(arch, factor, type(model).__name__)
    has_ffn_bias = any(f.experts.gate_bias is not None or f.down_bias is not None for _, f in layers)
    reasons = source_problems(source, arch, has_ffn_bias)
    reasons = reasons or factor_problems(factor, arch, approximate)
    if reasons:
        raise NotExportable(f"{factor.name} cannot be exported as {arch}: " + "; ".join(reasons))
    target = TARGETS.get(arch)
    width = layers[0][1].experts.expert_width
    shared = 0 if layers[0][1].shared is None else layers[0][1].shared.expert_width
    config = target.config(source, factor.n_experts, factor.top_k, width, shared)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}  # attention, norms, embeddings
    for i, (_, ffn) in enumerate(layers):
        state |= target.tensors(i, layer_tensors(ffn, factor, approximate), source)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export to {arch}: tensors missing {missing[:4]}, unexpected {unexpected[:4]}")
    stock.config.architectures = [type(stock).__name__]
    return stock.eval()


def compare(reference: nn.Module, exported: nn.Module, ids: torch.Tensor) -> dict:
    """Max |logit difference| and mean KL(reference || exported) per token, fp32, on `ids`."""
    with torch.no_grad():
        a = reference.float().eval()(ids).logits.float()
        b = exported.float().eval()(ids).logits.float()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "mean_kl": float(kl.sum(-1).mean()),
        "tokens": int(ids.numel()),
    }


def rounding_floor(model: nn.Module, ids: torch.Tensor) -> float:
    """How far the factorized model's own two implementations (the `reference` loop and the
    fast `sorted` dispatch) differ in the logits on `ids`, fp32: the rounding an exact export
    cannot be asked to beat. An exact export must agree within max(1e-4, twice this)."""
    logits = []
    with torch.no_grad():
        for path in ("reference", "sorted"):
            with use_dispatch(model, path):  # restores each layer's own path, also on an error
                logits.append(model.float().eval()(ids).logits.float())
    return float((logits[0] - logits[1]).abs().max())


def export(
    model: nn.Module, tokenizer, ids: torch.Tensor, out: str | Path, arch: str = "auto", approximate: bool = False
) -> dict:
    """Map, check against `model` on `ids`, write `out`, and check the folder loads as stock
    transformers. Returns what was measured."""
    stock = to_stock(model, arch, approximate)
    factor = factorized_layers(model)[0][1].config
    exact = not (approximate and _constant(factor) and 1 < factor.top_k < factor.n_experts)
    floor = rounding_floor(model, ids)
    tolerance = max(EXACT_TOLERANCE, 2 * floor) if exact else None
    check = compare(model, stock, ids) | {
        "arch": stock.config.model_type,
        "class": type(stock).__name__,
        "exact": exact,
        "tolerance": tolerance,
        "rounding_floor": floor,
    }
    if exact and check["max_abs_logit_diff"] > tolerance:
        raise RuntimeError(
            f"the export differs from the factorized model by {check['max_abs_logit_diff']:.2e} "
            f"> {tolerance:.2e} in the logits: a bug in the mapping, nothing written"
        )
    out = Path(out)
    with file_lock(out.with_name(f".{out.name}.lock")):  # two exports to one folder: one waits
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} was written by another export meanwhile; nothing written")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # written whole into a sibling, checked, then renamed: never a half-written --out
            check |= _write_checked(stock, tokenizer, tmp, model, ids, tolerance)
            (tmp / "factorllm_export.json").write_text(json.dumps(check | {"factor": factor.to_dict()}, indent=2))
            if out.exists():
                out.rmdir()  # an empty folder the user made
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return check


def _write_checked(stock, tokenizer, folder: Path, model, ids, tolerance: float | None) -> dict:
    """Save, then load the folder as stock transformers would and compare it with `model` again."""
    from transformers import AutoModelForCausalLM

    stock.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if "auto_map" in json.loads((folder / "config.json").read_text()):
        raise RuntimeError(f"{folder}/config.json names custom code (auto_map)")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    diff = compare(model, reloaded, ids)["max_abs_logit_diff"]
    if tolerance is not None and diff > tolerance:
        raise RuntimeError(
            f"the written folder, loaded back, differs from the factorized model by {diff:.2e} > {tolerance:.2e} "
            "in the logits: nothing written"
        )
    return {"reloaded_max_abs_logit_diff": diff}


def trial_record(path: str | Path) -> dict:
    """The record of a completed factorized trial, from its folder or its record.json."""
    folder = _folder(path)
    record = read_record(folder / RECORD_FILE)
    if record is None:
        raise FileNotFoundError(f"{folder} holds no readable trial record ({RECORD_FILE})")
    if record["status"] != "completed" or record["config"].get("factor") is None:
        raise NotExportable(
            f"{folder}: only a completed factorized trial can be exported "
            f"(status {record['status']}, {record['setting']})"
        )
    if not isinstance(record.get("model"), dict) or not isinstance(record["model"].get("architecture"), str):
        raise NotExportable(f"{folder}: the record does not say which model it converted (model.architecture)")
    return record


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == RECORD_FILE else path


def load_trial(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """(factorized model, tokenizer, record) of a completed trial, from its folder or record.
    Whether the source model's own code may run is the caller's to say (a command-line flag),
    never the record's: a trial folder can come from anyone."""
    from harness.assets.models import MODELS, config_json, load_model

    record = trial_record(path)
    folder = _folder(path)
    model_dir = folder / "model"
    if not (model_dir / "source.json").exists():
        raise FileNotFoundError(
            f"{model_dir} holds no trained weights (trials keep them since harness commit a3ff5f4, within record "
            f"schema 3): a completed record is never recomputed, so delete {folder / RECORD_FILE} and rerun the trial"
        )
    source = _checked_source(model_dir, record)
    if source["name"] not in MODELS and "auto_map" in config_json(source["name"]) and not trust_remote_code:
        raise NotExportable(
            f"the source model {source['name']!r} names its own code (auto_map in config.json), which would run "
            "to load it: pass --trust-remote-code if you trust it (the record's setting is not used)"
        )
    loaded = load_model(source["name"], dtype=torch.float32, device=device, trust_remote_code=trust_remote_code)
    if loaded.source.fingerprint != source["fingerprint"]:
        raise NotExportable(
            f"the source model {source['name']!r} changed since the trial "
            f"({loaded.source.fingerprint} against {source['fingerprint']})"
        )
    try:
        return load_trained_ffns(loaded.model, model_dir), loaded.tokenizer, record
    except (ValueError, RuntimeError, OSError, SafetensorError) as error:  # truncated, wrong shapes, ...
        raise NotExportable(f"{model_dir}: the trained layers do not load onto {source['name']!r}: {error}") from None


def _checked_source(model_dir: Path, record: dict) -> dict:
    """source.json and factor_config.json of a trial's kept weights, checked against its record:
    the same source model (name and fingerprint) and the same factor config."""
    try:
        source = json.loads((model_dir / "source.json").read_text())
        meta = json.loads((model_dir / FACTOR_CONFIG_FILE).read_text())
        saved = FactorConfig.from_dict(meta["factor_config"])
        if not (isinstance(source, dict) and isinstance(source.get("name"), str) and source.get("fingerprint")):
            raise ValueError("source.json needs the model's name and fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise NotExportable(f"{model_dir}: unreadable or incomplete kept weights ({error})") from None
    claimed = FactorConfig.from_dict(record["config"]["factor"])
    if saved != claimed:
        raise NotExportable(f"{model_dir} holds {saved.name} layers, but the record says {claimed.name}: not exported")
    wanted = (record["config"].get("model"), (record.get("model") or {}).get("fingerprint"))
    if (source["name"], source["fingerprint"]) != wanted:
        raise NotExportable(
            f"{model_dir}/source.json names {source['name']!r} ({source['fingerprint']}), but the record was trained "
            f"from {wanted[0]!r} ({wanted[1]}): not exported"
        )
    return source


def heldout_ids(tokenizer, record: dict, max_len: int, sequences: int | None = 2) -> torch.Tensor:
    """The trial's own held-out text, its first `sequences` sequences (None: all): what the
    export is checked on."""
    from harness.config import EvalConfig, build_section
    from harness.eval.heldout import as_batch, heldout_sequences

    ev, _ = build_section(EvalConfig, record["config"]["eval"] | {"tasks": "all"}, "eval")
    return as_batch(heldout_sequences(tokenizer, ev, max_len), sequences)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trial", help="a completed trial's folder (<records>/<trial_id>) or its record.json")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--arch", default="auto", choices=["auto", *TARGETS.names()])
    parser.add_argument("--format", default="hf", choices=["hf", "gguf"], help="gguf: also a GGUF file (llama.cpp)")
    parser.add_argument("--quant", default="f16", choices=["f16", "q8_0"], help="GGUF tensor type")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the source model's own code run (its config's auto_map); never taken from the record",
    )
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="export a constant combine at 1 < K < N anyway, reporting its measured error",
    )
    args = parser.parse_args(argv)
    setup_console()
    try:
        return _run(args)
    except KeyboardInterrupt:
        log.error("interrupted: nothing written to %s", args.out)  # export() removes its temporary folder
        return 130


def _out_problem(out: Path, trial: Path) -> str | None:
    if out.is_symlink():
        return f"--out {out} is a symbolic link; give the path of a plain folder"
    if why := output_problem(out, folder=True):
        return f"--out {why}"
    if out.exists() and any(out.iterdir()):
        return f"--out {out} exists and is not an empty folder"
    if out.resolve().is_relative_to(_folder(trial).resolve() / "model"):
        return f"--out {out} is inside the trial's own kept weights ({_folder(trial) / 'model'})"
    return None


def _run(args) -> int:
    out = Path(args.out)
    if not Path(args.trial).exists():
        log.error("%s does not exist: give a trial folder or its record.json", args.trial)
        return 2
    if why := _out_problem(out, Path(args.trial)):
        log.error("%s", why)
        return 2
    try:
        record = trial_record(args.trial)
        factor = FactorConfig.from_dict(record["config"]["factor"])
        arch = pick_arch(args.arch, factor, record["model"]["architecture"])
        reasons = factor_problems(factor, arch, args.approximate)  # before loading anything
        if args.format == "gguf" and (why := gguf_problem(arch)):
            reasons.append(why)
        if reasons:
            raise NotExportable(f"{factor.name} cannot be exported as {arch}: " + "; ".join(reasons))
        if args.format == "gguf":  # the extra, before anything is written
            from harness.serve import llama_class, llama_cpp_source

            llama_cpp_source(), llama_class()
        disable_progress_bar()  # transformers' weight-loading bars
        model, tokenizer, record = load_trial(args.trial, trust_remote_code=args.trust_remote_code)
        ids = heldout_ids(tokenizer, record, getattr(model.config, "max_position_embeddings", 2048))
        check = export(model, tokenizer, ids, out, arch, args.approximate)
    except (NotExportable, RuntimeError, ValueError, OSError) as error:  # ServeUnavailable is a RuntimeError
        log.error("%s", error)
        return 2
    log.info(
        "wrote %s (%s, %s): max |logit difference| %.2e, KL %.2e over %d held-out tokens",
        out,
        check["class"],
        "exact" if check["exact"] else "approximate",
        check["max_abs_logit_diff"],
        check["mean_kl"],
        check["tokens"],
    )
    if args.format == "gguf":
        from harness.serve import convert_to_gguf

        try:
            log.info("wrote %s", convert_to_gguf(out, args.quant))
        except RuntimeError as error:
            log.error("%s (the transformers folder %s is complete)", error, out)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
