"""A folder cache that is safe under concurrent preparation and detects corruption.

`prepare_cached(path, build)` returns `path` once it holds a complete, verified
build. The first caller takes an exclusive file lock, builds into a temporary
folder beside `path`, writes a manifest (size + sha256 of every file) last and
renames the folder into place; callers that arrive meanwhile wait on the lock and
then find the finished folder. A folder whose manifest is missing or disagrees
with its files (half-written, truncated, edited) is removed and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from reports.record import write_json_atomic

MANIFEST = "MANIFEST.json"
DISK_FULL_BYTES = 1 << 20  # less free space than this on a disk counts as full


def default_cache_root() -> Path:
    """$FACTORLLM_CACHE, else ~/.cache/factorllm."""
    return Path(os.environ.get("FACTORLLM_CACHE", Path.home() / ".cache" / "factorllm")).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file in it matches its size and hash."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            path = folder / name
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target` holding a verified build; `build(tmp_folder)` fills an empty folder."""
    target = Path(target)
    if is_complete(target):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if is_complete(target):  # another process finished while we waited
            return target
        if target.exists():
            shutil.rmtree(target)  # half-written or corrupt: rebuild from scratch
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            write_manifest(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
