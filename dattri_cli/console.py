"""Where output goes: results (paths, tables) on stdout, logs and timings on stderr.

On a terminal rich sizes its output to the window; piped or redirected, lines are
never wrapped (a path cut at 80 columns cannot be copied), and no colour codes are written.
"""

from __future__ import annotations

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


def rich_log_handler(**kwargs: Any) -> Any:
    """The console log handler of ``dattri run``: rich, on stderr (see configs/hydra/job_logging/rich.yaml)."""
    from rich.logging import RichHandler  # noqa: PLC0415

    return RichHandler(console=make_console(stderr=True), **kwargs)
