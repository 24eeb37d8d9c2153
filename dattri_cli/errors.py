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


def torch_load_refusal(path: object, exc: BaseException, what: str) -> str:
    """One sentence for a ``.pt`` file that ``torch.load(weights_only=True)`` refused.

    Torch's own message advises retrying with ``weights_only=False``, which would run
    whatever code the file carries; that advice is never passed on. A file holding
    pickled objects gets a recipe to convert it once, for users who trust its source;
    a corrupt, truncated or plain-pickle file gets the reason in a few words.
    """
    text = str(exc)
    if "Unsupported global" in text:
        return (
            f"{what} {path} holds pickled Python objects (code that runs when loaded), not only tensors, so it was not loaded; "
            'only if you trust its source, convert it once to safetensors: python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{path}', weights_only=False), 'f.safetensors')\" and use f.safetensors"
        )
    if "Weights only load failed" in text:
        reason = "it is not a torch file of tensors (corrupt, or a plain pickle)"
    elif isinstance(exc, EOFError) or not text.strip():
        reason = "the file is empty or truncated"
    else:
        reason = text.strip().splitlines()[0]
    return f"could not read {what} {path} as a weights-only torch file: {reason}"


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
