"""Score files: names, atomic writes and reading back.

A score file is safetensors with tensors ``scores`` (float32, ``(n_train, n_test)``),
``train_indices`` and ``test_indices`` (int64, positions in the source dataset),
and ONE metadata key holding sorted JSON. With several metadata keys the header
order (hence the file bytes) can change between saves; one key keeps identical
runs byte-identical. Timings and hostnames go to a sidecar ``run.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from dattri_cli.errors import DattriError

SCHEMA_VERSION = 1
SCORES = "scores"
TRAIN_INDICES = "train_indices"
TEST_INDICES = "test_indices"
METADATA_KEY = "dattri_cli"
SIDECAR_NAME = "run.json"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename into place, so readers never see a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        msg = f"cannot write {path} ({exc.strerror or exc}); choose a writable out=PATH"
        raise DattriError(msg) from exc
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: Path, overwrite: bool = True) -> None:
    """Fail early (before any heavy work) if ``path`` cannot be written.

    Creates the parent folder and a probe file in it: the only reliable test
    (permission bits say nothing about read-only mounts or root).
    """
    path = Path(path)
    if path.is_dir():
        msg = f"out={path} is a directory; give a file path ending in .safetensors"
        raise DattriError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=true or choose another out=PATH"
        raise DattriError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        msg = f"cannot write {path} ({exc.strerror or exc}); choose a writable out=PATH"
        raise DattriError(msg) from exc


def save_scores(
    path: Path,
    scores: Tensor,
    train_indices: Tensor,
    test_indices: Tensor,
    metadata: Dict[str, Any],
    extra: Optional[Dict[str, Tensor]] = None,
) -> None:
    """Write a score file atomically; metadata becomes one sorted-JSON string.

    ``extra`` adds optional float32 tensors (e.g. ``self_influence``, one per train row).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    if scores.shape != (train_indices.numel(), test_indices.numel()):
        msg = f"scores shape {tuple(scores.shape)} does not match indices ({train_indices.numel()}, {test_indices.numel()})"
        raise ValueError(msg)
    tensors = {
        SCORES: scores.detach().to("cpu", torch.float32).contiguous(),
        TRAIN_INDICES: train_indices.detach().to("cpu", torch.int64).contiguous(),
        TEST_INDICES: test_indices.detach().to("cpu", torch.int64).contiguous(),
    }
    for name, tensor in (extra or {}).items():
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    meta = {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **metadata}, sort_keys=True)}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_scores(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a score file back: its tensors and its decoded metadata."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        msg = f"score file not found: {path}"
        raise DattriError(msg)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
    except Exception as exc:  # noqa: BLE001 - any parse failure means a malformed file
        msg = f"{path} is not a readable safetensors score file ({exc})"
        raise DattriError(msg) from exc
    missing = [k for k in (SCORES, TRAIN_INDICES, TEST_INDICES) if k not in tensors]
    if missing or METADATA_KEY not in raw:
        msg = f"{path} is not a dattri-cli score file (missing {missing or [METADATA_KEY]})"
        raise DattriError(msg)
    return tensors, json.loads(raw[METADATA_KEY])


def sidecar_path(scores_path: Path) -> Path:
    """``run.json`` beside ``scores.safetensors``; ``NAME.run.json`` beside any other name."""
    scores_path = Path(scores_path)
    if scores_path.name == "scores.safetensors":
        return scores_path.parent / SIDECAR_NAME
    return scores_path.parent / f"{scores_path.stem}.{SIDECAR_NAME}"


def write_sidecar(path: Path, info: Dict[str, Any]) -> None:
    """Write the non-reproducible run facts (timings, host, time) next to the scores."""
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
