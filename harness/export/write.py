"""Checking an export against the factorized model and writing it: nothing reaches `--out`
unless the mapped model, and then the written folder loaded back as stock transformers,
agree with the factorized model on held-out text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from factorllm_core import factorized_layers, use_dispatch
from harness.assets.cache import file_lock
from harness.export.mapping import is_constant, to_stock

EXACT_TOLERANCE = 1e-4  # max |logit difference| of an exact export, fp32


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
    exact = not (approximate and is_constant(factor) and 1 < factor.top_k < factor.n_experts)
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
