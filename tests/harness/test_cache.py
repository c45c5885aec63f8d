import multiprocessing as mp
import time
from pathlib import Path

from harness.assets.cache import MANIFEST, is_complete, prepare_cached


def _slow_build(tmp: Path, log: str) -> None:
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(0.5)  # long enough that the other processes arrive mid-build
    (tmp / "weights.bin").write_bytes(b"x" * 1000)
    (tmp / "config.json").write_text("{}")


def _prepare(target: str, log: str, out: mp.Queue) -> None:
    folder = prepare_cached(Path(target), lambda tmp: _slow_build(tmp, log))
    out.put((folder / "weights.bin").read_bytes() == b"x" * 1000)


def test_concurrent_preparation_builds_once_and_all_see_a_complete_folder(tmp_path):
    target, log = tmp_path / "model", tmp_path / "log"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_prepare, args=(str(target), str(log), results)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [results.get(timeout=5) for _ in workers] == [True, True, True]
    assert log.read_text().count("built") == 1
    assert is_complete(target)
    assert not list(tmp_path.glob(".model.tmp-*"))  # no leftovers


def test_half_written_or_corrupt_cache_is_rebuilt(tmp_path):
    target, log = tmp_path / "model", tmp_path / "log"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"partial")  # a crash before the manifest
    prepare_cached(target, lambda tmp: _slow_build(tmp, str(log)))
    assert log.read_text().count("built") == 1 and is_complete(target)

    with open(target / "weights.bin", "r+b") as f:  # same size, different bytes
        f.write(b"y")
    assert not is_complete(target)
    prepare_cached(target, lambda tmp: _slow_build(tmp, str(log)))
    assert log.read_text().count("built") == 2 and is_complete(target)

    (target / MANIFEST).write_text("{not json")
    prepare_cached(target, lambda tmp: _slow_build(tmp, str(log)))
    assert log.read_text().count("built") == 3


def test_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"

    def failing(tmp):
        (tmp / "weights.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    try:
        prepare_cached(target, failing)
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.glob(".model.tmp-*"))
