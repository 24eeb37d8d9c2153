"""Train-side representations kept as blocks, in memory or on disk under a content key.

A :class:`BlockStore` maps block names to tensors: ``r{start}-{stop}`` (absolute train
rows, :func:`block_name`) for per-row representations, a stage's own names (a Hessian,
eigenpairs, K-FAC factors) for whole-train-set results; the runner keeps one store per
kind of representation and checkpoint. In memory it is a dict; on disk every block is
its own safetensors file written atomically, so a run killed at any moment leaves only
complete blocks, and a rerun resumes from them.

The directory of an on-disk store is named by :func:`cache_key`, a SHA-256 over
everything that determines the blocks (checkpoint bytes, the training data and
its indices, layer names, projection settings, dtype, the kind of representation).
``key.json`` in the directory repeats the key's inputs; a directory whose
``key.json`` does not match (or cannot be read) is wiped, never read.

Every block file records its name, the SHA-256 of its tensor's bytes, its shape
and dtype in the safetensors metadata; a read checks all of them, and a block that
fails (truncated, replaced, the wrong shape, another block's file) is a miss: it is
recomputed and atomically replaced, with one log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from torch import Tensor

from dattri_cli.hashing import data_fingerprint, json_sha256, tensor_sha256
from dattri_cli.io import atomic_write

log = logging.getLogger("dattri_cli")

KEY_FILE = "key.json"
#: Test hook: after this many blocks written by this process, SIGKILL ourselves.
KILL_ENV = "DATTRI_TEST_KILL_AFTER_BLOCKS"
#: Default most GiB of unprojected per-sample gradients an attributor keeps in the cache.
DEFAULT_MAX_STORE_GB = 2.0


def store_fits(
    nbytes: int, limit_gb: float, setting: str, log_once: Callable[[], bool] = lambda: True
) -> bool:
    """Whether ``nbytes`` of blocks may be kept under a limit of ``limit_gb`` GiB (``setting`` names it).

    When they may not, one log line (if ``log_once()`` says so) gives the size, the
    limit and how to raise it; the blocks are then computed and not kept.
    """
    limit = float(limit_gb) * 2**30
    if nbytes <= limit:
        return True
    if log_once():
        log.warning(
            "feature cache: not keeping these training gradients (%.1f GiB > %s=%g GiB); raise "
            "attributor.%s, or project them (attributor.projector_kwargs.proj_dim=...), to keep them",
            nbytes / 2**30,
            setting,
            limit_gb,
            setting,
        )
    return False


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 of the sorted JSON of ``parts``."""
    return json_sha256(dict(parts))


def block_name(start: int, stop: int) -> str:
    """The name of the block holding absolute train rows ``[start, stop)``."""
    return f"r{start:09d}-{stop:09d}"


class BlockStore:
    """Named tensor blocks; ``directory=None`` keeps them in memory."""

    def __init__(
        self, directory: Optional[Path] = None, key_parts: Optional[Mapping[str, Any]] = None
    ) -> None:
        """Open (creating if needed) the store; a directory whose key differs is emptied first."""
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
        recorded = _read_text(key_file)
        if recorded != key_text:
            if key_file.exists() or key_file.is_symlink():
                # never trust blocks computed for other inputs (or an unreadable key): start afresh
                log.warning(
                    "feature cache: %s does not match this run's key; recomputing its blocks", key_file
                )
                _remove(key_file)
                for old in self.directory.glob("*.safetensors"):
                    _remove(old)
            atomic_write(key_file, lambda tmp: Path(tmp).write_text(key_text))

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
        if not path.exists() and not path.is_symlink():
            return None
        block, problem = _read_block(path, name)
        if problem is not None:
            # a miss: the caller recomputes the block and put() replaces the file atomically
            log.warning("feature cache: block %s is unusable (%s); recomputing it", path, problem)
            return None
        return block

    def put(self, name: str, block: Tensor) -> None:
        """Store a block (atomically on disk)."""
        block = block.detach().contiguous()
        if self.directory is None:
            self._memory[name] = block
            return
        from safetensors.torch import save_file  # noqa: PLC0415

        cpu = block.to("cpu")
        meta = {
            "name": name,
            "sha256": tensor_sha256(cpu),
            "shape": json.dumps(list(cpu.shape)),
            "dtype": str(cpu.dtype),
        }
        path = self._path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        atomic_write(path, lambda tmp: save_file({"block": cpu}, tmp, metadata=meta))
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


def _read_text(path: Path) -> Optional[str]:
    """The file's text, or None when it is missing or cannot be read as text (a directory, bad bytes)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _remove(path: Path) -> None:
    """Delete a file, link or directory that is in the way (gone already is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_block(path: Path, name: str) -> tuple:
    """``(tensor, None)`` for a block file that passes every check, else ``(None, reason)``."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            # a copy in fresh (aligned) memory: the file's data offset follows the header's
            # length, and matrix products on unaligned memory can differ in the last bit
            block = handle.get_tensor("block").clone()
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, a directory: all a miss
        return None, f"cannot be read: {type(exc).__name__}"
    if meta.get("name") != name:
        return None, "no record of its content, or another block's record"
    if meta.get("shape") != json.dumps(list(block.shape)) or meta.get("dtype") != str(block.dtype):
        return None, f"shape {tuple(block.shape)} {block.dtype} differs from the recorded one"
    if meta.get("sha256") != tensor_sha256(block):
        return None, "content hash differs from the recorded one"
    if name.startswith("r") and "-" in name:  # row blocks: the name says how many rows
        start, _, stop = name[1:].partition("-")
        if (
            start.isdigit()
            and stop.isdigit()
            and (block.dim() == 0 or block.shape[0] != int(stop) - int(start))
        ):
            return (
                None,
                f"{block.shape[0] if block.dim() else 0} rows where the name says {int(stop) - int(start)}",
            )
    return block, None


def train_fingerprint(x_train: Tensor, y_train: Tensor, train_indices: Tensor) -> str:
    """SHA-256 of the training tensors and their indices (the test side plays no part)."""
    return data_fingerprint((x_train, y_train, train_indices), with_layout=True)


__all__ = [
    "DEFAULT_MAX_STORE_GB",
    "KILL_ENV",
    "BlockStore",
    "store_fits",
    "block_name",
    "cache_key",
    "tensor_sha256",
    "train_fingerprint",
]
