"""Console and trial log: the console shows events, each trial's log file holds the rest.

Every module logs through `logging.getLogger(__name__)`. `setup_console()` (called by each
command) sends the harness's and the reports' messages to the console: INFO to stdout,
warnings and errors to stderr. While a trial runs, `trial_log(path)` writes everything to
`<trial dir>/trial.log`: every logger's messages (lm-eval's and transformers' warnings
included) and whatever reaches the process's stdout and stderr (progress bars, prints,
native libraries), through the file descriptors themselves. The console keeps only the
trial's events: its stages (logger `harness.trial`) and warnings from the harness.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

OURS = ("harness", "reports", "factorllm_core")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Console(logging.Handler):
    """INFO to stdout as is; warnings and errors to stderr as `warning: ...` / `error: ...`.
    The streams are looked up when a message is written (so redirections of sys.stdout
    apply), except while `stream` pins them to the terminal during a trial."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stream: TextIO | None = None  # set by trial_log: the console behind the redirected fds
        self.only: tuple[str, ...] | None = None  # set by trial_log: the loggers whose INFO still shows

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(OURS):
            return False
        if self.only is not None and record.levelno < logging.WARNING:
            return record.name in self.only
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            stream = self.stream or (sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # logging must never take the program down (logging.Handler's own rule)
            self.handleError(record)


def setup_console() -> Console:
    """The console handler on the root logger, added once per process."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, Console):
            return handler
    handler = Console()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


@contextmanager
def trial_log(path: str | Path, console_loggers: tuple[str, ...] = ("harness.trial",)) -> Iterator[None]:
    """Everything this process logs or prints goes to `path` (appended) until the block ends;
    the console keeps INFO from `console_loggers` and warnings from the harness."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = setup_console()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    with open(path, "ab", buffering=0) as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        root.addHandler(file_handler)
        handler.stream, handler.only = terminal, console_loggers
        try:
            yield
        finally:
            handler.stream, handler.only = None, None
            root.removeHandler(file_handler)
            file_handler.close()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()
