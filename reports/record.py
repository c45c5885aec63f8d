"""The trial record: its schema, how it is written, and how it is read, in one place.

The harness writes every record through `write_record`; the report and the harness
read them through `read_record` / `load_records`, with the same validity rule. A
record is self-describing: besides its config it carries the names derived from it
when it was written (`harness.config.TrialConfig.describe`): label, variant,
setting, recipe, active FFN fraction, whether it is the paper's recipe, and the
values of the options that define the variant (`factors`). Nothing here imports
torch or the harness: the standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
# eval fields added after records existed, each with the value that reproduces what older records
# measured: left out of trial ids and of the key that pairs trials when at that value, so a record
# written before the field existed pairs with (and is found as) one written after
EVAL_ADDED_LATER = {"benchmarks": True, "heldout_documents": 0}
# 3: the names derived from the config (label, variant, setting, recipe, active_fraction,
#    paper_recipe, factors); 2: per-item outcomes, chance levels, held-out loss/KL, churn.
SCHEMA = 3
REQUIRED = (
    "schema",
    "trial_id",
    "status",
    "label",
    "variant",
    "setting",
    "recipe",
    "active_fraction",
    "paper_recipe",
    "factors",
    "config",
    "stage_seconds",
)
STATUSES = ("running", "completed", "failed", "stopped")  # stopped: by an early-stopping scheduler
METRIC_FIELDS = ("metric", "value", "n")  # what a report reads of every benchmark result


def new_record(described: dict, **fields) -> dict:
    """A record in this schema: `described` is TrialConfig.describe(), `fields` the rest."""
    return {"schema": SCHEMA, **described, "status": "running", "error": None, "stage_seconds": {}, **fields}


def failed_record(described: dict, reason: str) -> dict:
    """A trial that ended without its own record (Ray gave up on its worker): `failed`, the reason, no numbers."""
    return new_record(described, status="failed", error=reason)


def stopped_record(described: dict, last: dict, series: list[dict]) -> dict:
    """A trial an early-stopping scheduler stopped: `stopped`, the last point it reported, the
    tokens it trained on, and its training series. A trial Ray retried reports the steps after
    its checkpoint again: each step is kept once, its latest report."""
    by_step = {point["step"]: point for point in series if "step" in point}
    return new_record(
        described,
        status="stopped",
        stopped={"by": "scheduler", "last": last, "tokens": last.get("tokens", 0)},
        training={
            "tokens": last.get("tokens", 0),
            "steps": last.get("step", 0),
            "series": [by_step[step] for step in sorted(by_step)],
        },  # fmt: skip
    )


def problem(record) -> str | None:
    """Why `record` is not a readable record of this schema, or None."""
    if not isinstance(record, dict):
        return "not a trial record (not a JSON object)"
    if record.get("schema") != SCHEMA:
        return (
            f"schema {record.get('schema')!r}, this harness reads schema {SCHEMA}: rerun the trial "
            "(its trial id is unchanged, so a sweep reruns it)"
        )
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is none of {', '.join(STATUSES)}"
    config = record["config"]
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        return "config is not a trial config"
    metrics = record.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        return "metrics is not a mapping of benchmark -> result"
    for name, result in (metrics or {}).items():
        missing = [key for key in METRIC_FIELDS if not isinstance(result, dict) or key not in result]
        if missing:
            return f"metrics.{name}: missing field(s) {', '.join(missing)}"
    return _shape_problem(record)  # last: the specific messages above come first


# The shapes a report relies on: (where, what it must be, test).
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SHAPES = (
    ("config.model", "a model name", lambda r: isinstance(r["config"].get("model"), str)),
    ("config.factor", "a mapping or null", lambda r: isinstance(r["config"].get("factor"), (dict, type(None)))),
    ("config.eval", "a mapping", lambda r: isinstance(r["config"].get("eval"), dict)),
    (
        "config.train.data_budget_tokens",
        "an integer",
        lambda r: isinstance(r["config"]["train"].get("data_budget_tokens"), int),
    ),
    ("factors", "a mapping", lambda r: isinstance(r["factors"], dict)),
    ("setting, recipe, variant, label", "strings", lambda r: all(isinstance(r[k], str) for k in _NAMES)),
    ("active_fraction", "a number", lambda r: _is_number(r["active_fraction"])),
    ("metrics.*.value", "numbers", lambda r: all(_is_number(m["value"]) for m in (r.get("metrics") or {}).values())),
    (
        "heldout.per_sequence_loss",
        "a list of numbers",
        lambda r: r.get("heldout") is None or _numbers(r["heldout"].get("per_sequence_loss") or []),
    ),
    (
        "flops.*_gflops_per_token",
        "numbers",
        lambda r: (
            r.get("flops") is None
            or all(_is_number(v) for k, v in r["flops"].items() if k.endswith("_gflops_per_token"))
        ),
    ),
)
_NAMES = ("setting", "recipe", "variant", "label")


def _numbers(values) -> bool:
    return isinstance(values, list) and all(_is_number(v) for v in values)


def _shape_problem(record: dict) -> str | None:
    for where, what, test in _SHAPES:
        try:
            ok = test(record)
        except (AttributeError, KeyError, TypeError):
            ok = False
        if not ok:
            return f"{where} must be {what}"
    return None


def read_record(path: str | Path) -> dict | None:
    """The record at `path`, or None when there is none. An unreadable, corrupt or
    other-schema one (a torn write, a full disk, an edit, an older harness) is named in a
    warning and treated as missing: a sweep runs that trial again, a report skips it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_json_bounded(path, MAX_RECORD_BYTES)
        why = problem(record)
    except (OSError, ValueError, RecursionError) as error:
        why = f"{type(error).__name__}: {str(error)[:200]}"
    if why:
        log.warning(
            "unreadable record %s (%s): treated as missing (a sweep runs the trial again, a report leaves it out)",
            path,
            why,
        )
        return None
    return record


MAX_RECORD_BYTES = 64 << 20  # a record with per-item outcomes of the full benchmark sets is a few MB


def read_json_bounded(path: str | Path, max_bytes: int):
    """JSON from a regular file of at most `max_bytes`: a FIFO would block the reader, a device
    (a symlink to /dev/zero) never end, and a huge file take all memory; each is refused before it
    is read. Nesting too deep for the decoder raises RecursionError (callers treat it as unreadable)."""
    info = os.stat(path)  # follows symlinks: what would actually be read
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a pipe, a device or a folder?)")
    if info.st_size > max_bytes:
        raise ValueError(f"{path} is {info.st_size:,} bytes, over the {max_bytes:,} a record file may have")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} grew past {max_bytes:,} bytes while read")
    return json.loads(data)


def load_records(folder: str | Path) -> list[dict]:
    """Every readable record.json below `folder` (see read_record)."""
    return [r for path in sorted(Path(folder).glob(f"**/{RECORD_FILE}")) if (r := read_record(path)) is not None]


def output_problem(path: str | Path, folder: bool) -> str | None:
    """Why `path` cannot be written as a folder (`folder`) or a file, or None: checked by every
    command before it loads anything, so a bad --out is refused at once, not after the work.
    (Missing parents are fine: writes create them.)"""
    text = str(path)
    if "\0" in text or not text.strip():
        return f"{text!r} is not a path"
    path = Path(path).expanduser()
    if path.exists() and folder and not path.is_dir():
        return f"{path} is a file; give a folder"
    if path.exists() and not folder and path.is_dir():
        return f"{path} is a folder; give a file name"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, so {path} cannot be created"
            if not os.access(parent, os.W_OK):
                return f"{parent} is not writable"
            break
    kind = filesystem_type(path)
    if kind in VIRTUAL_FILESYSTEMS:
        return f"{path} is on the kernel's {kind} file system, which holds no files; give a folder on a disk"
    return None


# kernel file systems that look writable to root but hold no files (writes fail or do something else)
VIRTUAL_FILESYSTEMS = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc",
                       "nsfs", "rpc_pipefs")  # fmt: skip


def filesystem_type(path: Path) -> str | None:
    """The file system type of the mount that holds `path` (or would hold it), from
    /proc/self/mounts (Linux); elsewhere /proc and /sys by name, else None."""
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f.read(1 << 20).splitlines() if len(line.split()) >= 3]
    except OSError:
        top = resolved.parts[1] if len(resolved.parts) > 1 else ""
        return {"proc": "proc", "sys": "sysfs"}.get(top)
    best, kind = -1, None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        mount = Path(point)
        if (resolved == mount or mount in resolved.parents) and len(mount.parts) > best:
            best, kind = len(mount.parts), fstype
    return kind


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over it:
    a crash mid-write never leaves a torn file, and a failed write (a full disk) leaves
    no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_fsynced(path: str | Path, fill: Callable) -> None:
    """Atomically write a file that `fill(handle)` fills, fsynced before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    _write_fsynced(path, lambda f: f.write(text))


def write_json_atomic(path: str | Path, data) -> None:
    """JSON (NaN refused) written atomically and fsynced."""
    _write_fsynced(path, lambda f: json.dump(data, f, indent=2, sort_keys=True, allow_nan=False))


def write_record(path: str | Path, record: dict) -> None:
    """Write a record atomically; refuses one that this module would not read back."""
    why = problem(record)
    if why:
        raise ValueError(f"refusing to write record {path}: {why}")
    write_json_atomic(path, record)


def non_finite_paths(value, path: str = "") -> list[str]:
    """Where in a nested structure a float is NaN or infinite."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_paths(v, f"{path}[{i}]")]
    return []


# What a report reads from a record, by name (the config's names were derived when it was written).


def setting(record: dict) -> str:
    """1R4E2K, 1R3E1K1S or dense."""
    return record["setting"]


def active_pct(record: dict) -> float:
    """Share of the FFN's neurons active per token, %."""
    return 100 * record["active_fraction"]


def is_dense(record: dict) -> bool:
    return record["config"].get("factor") is None
