"""`python -m harness.eval` checks every argument before it loads a model."""

import pytest

from harness.eval import cli as evaluate


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--limit", "0"], "--limit 0 must be >= 1"),
        (["--tasks", ""], "--tasks '' names no benchmark"),
        (["--tasks", " , "], "names no benchmark"),
        (["--tasks", "squad"], "tasks='squad' is not a known benchmark"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_model_is_one_line_and_exit_2(capsys, cache_dir):
    assert evaluate.main(["--model", "no-such-org/no-such-model", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'no-such-org/no-such-model': ") and "Traceback" not in err
