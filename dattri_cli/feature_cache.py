"""Train-side representations kept as blocks, in memory or on disk under a content key.

A :class:`BlockStore` maps block names (``c{checkpoint}-r{start}-{stop}``, absolute
train rows) to tensors. In memory it is a dict; on disk every block is its own
safetensors file written atomically, so a run killed at any moment leaves only
complete blocks, and a rerun resumes from them.

The directory of an on-disk store is named by :func:`cache_key`, a SHA-256 over
everything that determines the blocks (checkpoint bytes, the training data and
its indices, layer names, projection settings, dtype, the kind of representation).
``key.json`` in the directory repeats the key's inputs; a directory whose
``key.json`` does not match is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from torch import Tensor

from dattri_cli.io import _atomic_write

KEY_FILE = "key.json"
#: Test hook: after this many blocks written by this process, SIGKILL ourselves.
KILL_ENV = "DATTRI_TEST_KILL_AFTER_BLOCKS"


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 of the sorted JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def block_name(start: int, stop: int) -> str:
    """The name of the block holding absolute train rows ``[start, stop)``."""
    return f"r{start:09d}-{stop:09d}"


class BlockStore:
    """Named tensor blocks; ``directory=None`` keeps them in memory."""

    def __init__(self, directory: Optional[Path] = None, key_parts: Optional[Mapping[str, Any]] = None) -> None:
        """Open (creating if needed) the store; refuse a directory whose key differs."""
        self.directory = Path(directory) if directory is not None else None
        self._memory: Dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._written = 0
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        key_text = json.dumps(dict(key_parts or {}), sort_keys=True, default=str)
        key_file = self.directory / KEY_FILE
        if key_file.exists() and key_file.read_text() != key_text:
            # never trust blocks computed for other inputs: start this store afresh
            for old in self.directory.glob("*.safetensors"):
                old.unlink()
        if not key_file.exists() or key_file.read_text() != key_text:
            _atomic_write(key_file, lambda tmp: Path(tmp).write_text(key_text))

    @classmethod
    def keyed(cls, root: Path, kind: str, parts: Mapping[str, Any]) -> "BlockStore":
        """An on-disk store at ``root/kind/<cache_key(parts)>``."""
        full = {"kind": kind, **parts}
        return cls(Path(root).expanduser() / kind / cache_key(full), full)

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.safetensors"

    def get(self, name: str) -> Optional[Tensor]:
        """The block, or None if it was never completed."""
        if self.directory is None:
            return self._memory.get(name)
        path = self._path(name)
        if not path.exists():
            return None
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))["block"]

    def put(self, name: str, block: Tensor) -> None:
        """Store a block (atomically on disk)."""
        block = block.detach().contiguous()
        if self.directory is None:
            self._memory[name] = block
            return
        from safetensors.torch import save_file  # noqa: PLC0415

        cpu = block.to("cpu")
        _atomic_write(self._path(name), lambda tmp: save_file({"block": cpu}, tmp))
        self._written += 1
        limit = os.environ.get(KILL_ENV)
        if limit and self._written >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    def lookup(self, name: str) -> Optional[Tensor]:
        """:meth:`get`, counted as a hit, or as a miss when the block must be computed (and put)."""
        block = self.get(name)
        if block is None:
            self.misses += 1
        else:
            self.hits += 1
        return block

    def get_or_compute(self, name: str, compute: Callable[[], Tensor], device: str = "cpu") -> Tensor:
        """The stored block, or ``compute()`` stored and returned."""
        block = self.lookup(name)
        if block is not None:
            return block.to(device)
        block = compute()
        self.put(name, block)
        return block


def train_fingerprint(x_train: Tensor, y_train: Tensor, train_indices: Tensor) -> str:
    """SHA-256 of the training tensors and their indices (the test side plays no part)."""
    digest = hashlib.sha256()
    for t in (x_train, y_train, train_indices):
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


__all__ = ["KILL_ENV", "BlockStore", "block_name", "cache_key", "train_fingerprint"]
