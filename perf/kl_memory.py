"""The distillation KL's memory: the blocked computation (harness.train.distillation_kl) against
the plain one (distillation_kl_reference), forward and backward, after checking that both give
the same loss and gradient bit for bit.

    python perf/kl_memory.py                      # CPU, 4 x 256 positions x 32,768 vocabulary (~15 s)
    python perf/kl_memory.py --vocab 262144       # Gemma3's vocabulary (~3 GB for the plain one)

Each side runs in its own process, and its peak resident memory above its inputs (Linux's VmHWM,
reset once the inputs exist) is printed with the ratio. Exit 1 if the two disagree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.train import distillation_kl, distillation_kl_reference  # noqa: E402

SIDES = {"blocked": distillation_kl, "reference": distillation_kl_reference}


def inputs(batch: int, positions: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(batch, positions, vocab, generator=g)
    student = torch.randn(batch, positions, vocab, generator=g).requires_grad_()
    return dense, student, torch.ones(batch, positions)


def same_bits(batch: int, positions: int, vocab: int) -> bool:
    dense, student, mask = inputs(batch, positions, vocab)
    twin = student.detach().clone().requires_grad_()
    ours, theirs = distillation_kl(dense, student, mask), distillation_kl_reference(dense, twin, mask)
    ours.backward()
    theirs.backward()
    return torch.equal(ours, theirs) and torch.equal(student.grad, twin.grad)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this script measures memory on Linux)")


def measure(side: str, batch: int, positions: int, vocab: int) -> None:
    """Run in a child: print peak RSS above the inputs (MB) and the seconds forward + backward. The
    kernel's peak (VmHWM) is reset after the inputs exist, so imports do not count."""
    torch.set_num_threads(1)
    dense, student, mask = inputs(batch, positions, vocab)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    SIDES[side](dense, student, mask).backward()
    seconds = time.perf_counter() - start
    print(f"{(_status_kb('VmHWM') - before) / 1024:.0f} {seconds:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32_768)
    parser.add_argument("--child", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.batch, args.positions, args.vocab)
    if args.child:
        measure(args.child, *shape)
        return 0
    if not same_bits(2, 300, 1000):  # across a block boundary, with a cheap shape
        print("correctness: FAILED (the blocked KL differs from the reference)")
        return 1
    print("correctness: blocked KL equals the reference bit for bit (loss and gradient)")
    print(f"logits {args.batch} x {args.positions} x {args.vocab:,}, float32, 1 thread")
    peaks = {}
    for side in ("reference", "blocked"):
        cmd = [sys.executable, __file__, "--child", side, "--batch", str(args.batch),
               "--positions", str(args.positions), "--vocab", str(args.vocab)]  # fmt: skip
        peak, seconds = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        peaks[side] = float(peak)
        print(f"| {side} | peak above inputs {float(peak):,.0f} MB | forward + backward {seconds} s |")
    ratio = f"{peaks['blocked'] / peaks['reference']:.2f}" if peaks["reference"] > 0 else "n/a (too small to measure)"
    print(f"blocked / reference peak memory: {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
