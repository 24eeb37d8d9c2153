"""Progress for long loops: a rich bar on a terminal, heartbeat log lines elsewhere.

Attributors and trainers wrap their loops in :func:`track`; the command line sets
the mode once with :func:`set_mode`. The library default is ``off`` so that
importing and calling attributors from Python prints nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("dattri_cli")

MODES = ("off", "log", "rich", "auto")
_mode = "off"
_heartbeat_s = 10.0


def set_mode(mode: str, heartbeat_s: float = 10.0) -> None:
    """Choose how :func:`track` reports: off, log (heartbeat lines), rich (bar), auto."""
    global _mode, _heartbeat_s  # noqa: PLW0603 - one process-wide setting
    if mode not in MODES:
        msg = f"progress must be one of {', '.join(MODES)}, got {mode!r}"
        raise ValueError(msg)
    _mode = mode
    _heartbeat_s = heartbeat_s


def current_mode() -> str:
    """The effective mode (``auto`` resolved against the terminal)."""
    if _mode == "auto":
        return "rich" if sys.stderr.isatty() else "log"
    return _mode


def track(iterable: Iterable[T], description: str, total: Optional[int] = None) -> Iterator[T]:
    """Yield from ``iterable`` while reporting progress in the current mode."""
    mode = current_mode()
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if mode == "off":
        yield from iterable
        return
    if mode == "rich":
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)
        return
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= _heartbeat_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s done, %.0fs elapsed", description, done, of, now - start)
    elapsed = time.monotonic() - start
    if elapsed >= 1.0:
        log.info("%s: %d done in %.1fs", description, done, elapsed)
