"""`python -m harness.export`: one trial folder in, one checked folder (and GGUF) out; every
refusal one line and exit 2, Ctrl-C exit 130 with nothing written."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from factorllm_core import FactorConfig
from harness import export as package
from harness.export.mapping import NotExportable, factor_problems, gguf_problem, pick_arch
from harness.export.target import TARGETS
from harness.export.write import export
from harness.logs import setup_console
from harness.trial_folder import heldout_ids, load_trial, trial_folder, trial_record
from reports.record import output_problem

log = logging.getLogger("harness.export")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.export",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    if out.resolve().is_relative_to(trial_folder(trial).resolve() / "model"):
        return f"--out {out} is inside the trial's own kept weights ({trial_folder(trial) / 'model'})"
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
