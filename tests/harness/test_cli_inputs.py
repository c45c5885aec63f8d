"""Every command checks its arguments before it loads anything, and answers a bad one with one
line and exit 2: missing paths, files where folders are expected and the reverse, empty
folders, and records of a wrong schema (skipped with a warning naming the file and field)."""

import json

import pytest

from harness import export as export_module
from harness import sweep as sweep_module
from harness import trial as trial_module
from harness.eval import cli as eval_module
from reports import build as build_module


def _exit(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def places(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    return {
        "missing": tmp_path / "nope",
        "file": tmp_path / "file.txt",
        "empty": tmp_path / "empty",
        "under a file": tmp_path / "file.txt" / "sub",
    }


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("a model or trial was loaded before the arguments were checked")

    monkeypatch.setattr(eval_module, "load_model", fail)
    monkeypatch.setattr(trial_module, "run_trial", fail)
    monkeypatch.setattr("harness.export.cli.load_trial", fail)


@pytest.mark.parametrize("where, message", [
    ("missing", "is not a sweep folder"),
    ("file", "is not a sweep folder"),
    ("empty", "is not a sweep folder"),
])  # fmt: skip
def test_reports_build_refuses_what_is_not_a_sweep_folder(where, message, places, capsys):
    assert _exit(build_module.main, [str(places[where])]) == 2
    assert message in _one_error_line(capsys)
    assert not (places["missing"]).exists()  # nothing created for a folder that does not exist


def test_reports_build_refuses_a_sweep_folder_without_records(places, capsys):
    (places["empty"] / "records").mkdir()
    assert _exit(build_module.main, [str(places["empty"])]) == 2
    assert "holds no record.json: nothing to report" in _one_error_line(capsys)
    assert not (places["empty"] / "report").exists()


@pytest.mark.parametrize("where, message", [("file", "is a file; give a folder"), ("under a file", "is a file, so")])
def test_reports_build_checks_out_before_reading(where, message, places, capsys):
    (places["empty"] / "records").mkdir()
    assert _exit(build_module.main, [str(places["empty"]), "--out", str(places[where])]) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"schema": 1, "trial_id": "old", "status": "completed"}, "schema 1"),
        ("metric without its name", "metrics.arc_easy: missing field(s) metric"),
        ("metrics a list", "metrics is not a mapping"),
    ],
)
def test_reports_build_skips_records_of_a_wrong_schema_naming_file_and_field(bad, field, tmp_path, capsys, caplog):
    from tests.reports.test_report import factor, record

    good = [record("dense", scores=0.6, ffn=1.0, loss=3.0), record("k1", factor(1), scores=0.4, ffn=0.26, loss=6.0)]
    if bad == "metric without its name":
        bad = record("k2", factor(2), scores=0.5, ffn=0.51, loss=4.0)
        del bad["metrics"]["arc_easy"]["metric"]
    elif bad == "metrics a list":
        bad = record("k2", factor(2), scores=0.5, ffn=0.51, loss=4.0) | {"metrics": [1]}
    sweep = tmp_path / "sweep"
    for r in [*good, bad]:
        folder = sweep / "records" / r["trial_id"]
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(r))
    assert _exit(build_module.main, [str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    warning = [m for m in caplog.messages if "unreadable record" in m]
    assert len(warning) == 1 and f"{bad['trial_id']}/record.json" in warning[0] and field in warning[0], warning


@pytest.mark.parametrize("where, message", [
    ("empty", "is a folder; give a file name"),
    ("under a file", "is a file, so"),
])  # fmt: skip
def test_harness_eval_checks_json_before_loading(where, message, places, no_loading, capsys):
    assert _exit(eval_module.main, ["--tasks", "arc_easy", "--json", str(places[where])]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{empty_yaml}"], "the file is empty"),
    (["{missing}"], "no such file"),
    (["{empty}"], "not a regular file"),
    (["{binary}"], "not UTF-8 text"),
    (["{good}", "--device", "tpu9"], "--device 'tpu9' is not a device"),
    (["{good}", "--out", "{file}"], "--out {file} is a file; give a folder"),
    (["{good}", "--out", "{under a file}"], "is a file, so"),
])  # fmt: skip
def test_harness_trial_checks_every_argument_before_running(argv, message, places, tmp_path, no_loading, capsys):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(b"model: \xff\xfe")
    (tmp_path / "good.yaml").write_text("model: smollm2-135m\nfactor: null\n")
    names = {k: str(v) for k, v in places.items()} | {
        "empty_yaml": str(tmp_path / "empty.yaml"),
        "binary": str(tmp_path / "binary.yaml"),
        "good": str(tmp_path / "good.yaml"),
    }
    argv = [a.format(**names) for a in argv]
    assert _exit(trial_module.main, argv) == 2
    assert message.format(**names) in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing", "empty", "file"])
def test_harness_export_refuses_what_is_not_a_trial(where, places, tmp_path, no_loading, capsys):
    assert _exit(export_module.main, [str(places[where]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("where, message", [("file", "is a file; give a folder"), ("under a file", "is a file, so")])
def test_harness_export_checks_out_first(where, message, places, no_loading, capsys):
    assert _exit(export_module.main, [str(places["empty"]), "--out", str(places[where])]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [
    ("missing", "no such file"),
    ("empty", "not a regular file"),
])  # fmt: skip
def test_harness_sweep_refuses_a_grid_that_is_not_a_file(where, message, places, capsys):
    assert _exit(sweep_module.main, [str(places[where]), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_harness_sweep_checks_storage_before_loading_the_grid(places, capsys):
    assert _exit(sweep_module.main, [str(places["missing"]), "--storage", str(places["file"])]) == 2
    line = _one_error_line(capsys)
    assert "--storage" in line and "is a file; give a folder" in line  # before the (missing) grid is read
