"""Where output goes: results (paths, tables) on stdout, logs and timings on stderr.

On a terminal rich sizes its output to the window; piped or redirected, lines are
never wrapped (a path cut at 80 columns cannot be copied), and no colour codes are written.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

#: width used when the stream is not a terminal: wide enough that nothing wraps
UNWRAPPED_WIDTH = 10_000


def make_console(stderr: bool = False) -> Any:
    """A rich Console on stdout (results) or stderr (logs), unwrapped unless a terminal."""
    from rich.console import Console  # noqa: PLC0415 - keep `dattri --help` fast

    stream = sys.stderr if stderr else sys.stdout
    if hasattr(stream, "isatty") and stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=UNWRAPPED_WIDTH, soft_wrap=True)


class PlainLogHandler(logging.StreamHandler):
    """Log lines on stderr as ``LEVEL message`` (INFO as the bare message), one line each.

    Used when stderr is not a terminal: rich's handler pads every line to the console
    width, which for an unwrapped console is thousands of spaces.
    """

    def __init__(self, **_rich_options: Any) -> None:
        """Write to stderr; rich-only options from the logging config are ignored."""
        super().__init__(sys.stderr)

    def format(self, record: logging.LogRecord) -> str:
        """The formatted message, prefixed by its level when it is not INFO."""
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname} {message}"


def rich_log_handler(**kwargs: Any) -> Any:
    """The console log handler of ``dattri run`` on stderr (see configs/hydra/job_logging/rich.yaml).

    rich on a terminal; plain lines when stderr is piped or redirected.
    """
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return PlainLogHandler(**kwargs)
    from rich.logging import RichHandler  # noqa: PLC0415

    return RichHandler(console=make_console(stderr=True), **kwargs)
