"""User-facing errors.

Anything a user can fix (a bad config value, a missing file, a singular Hessian)
raises :class:`DattriError` with one actionable sentence. The command line prints
that sentence and exits non-zero; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class DattriError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(DattriError):
    """A config value is unknown, mistyped or out of range."""


class CheckpointError(DattriError):
    """A checkpoint is missing or does not fit the model."""


class DataError(DattriError):
    """A dataset file is missing, malformed or does not fit the request."""


class NumericalError(DattriError):
    """A solver met NaN/Inf, a singular matrix or divergence."""


@contextlib.contextmanager
def reported(debug: bool = False) -> Iterator[None]:
    """Turn a DattriError into one ``error:`` line and exit 2, Ctrl-C into exit 130.

    With ``debug`` the exception propagates with its traceback.
    """
    try:
        yield
    except DattriError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
