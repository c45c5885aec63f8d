"""The self-describing trial record: environment, versions, and NaN-free metrics."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECORD_FILE = "record.json"


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "lm_eval": _version("lm_eval"),
            "fvcore": _version("fvcore"), "ray": _version("ray"), "git_sha": git_sha(),
            "host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def non_finite_paths(value, path: str = "") -> list[str]:
    """Where in a nested structure a float is NaN or infinite."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_paths(v, f"{path}[{i}]")]
    return []


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None when there is none. A corrupt or unreadable one
    (a torn write, a full disk, an edit) is named in a warning and treated as
    missing, so the trial runs again instead of the whole sweep stopping."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "status" not in record:
            raise ValueError("not a trial record (no status)")
        return record
    except (OSError, ValueError) as error:
        print(f"warning: unreadable record {path} ({type(error).__name__}: {error}); treated as missing, "
              f"the trial runs again", file=sys.stderr, flush=True)
        return None
