"""SHA-256 identities: ``json_sha256(x) = SHA-256(sorted JSON of x)``, files and tensors by their bytes.

Every key in the package (config hash, checkpoint cache, feature cache, ground truth,
data fingerprints) is one of these, so two runs agree on a key exactly when they
agree on what it covers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

#: bytes read per step when hashing a file
CHUNK_BYTES = 1 << 20


def json_sha256(value: Any) -> str:
    """SHA-256 (hex) of ``value`` as sorted JSON (values JSON cannot hold are written with ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path | str) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(tensors: Iterable[Tensor], with_layout: bool = False) -> str:
    """SHA-256 (hex) of the tensors' bytes in order; ``with_layout`` also hashes each shape and dtype.

    The checkpoint cache keys on the bytes only, the feature cache on bytes and layout;
    both are kept as they are so that existing caches stay valid.
    """
    digest = hashlib.sha256()
    for t in tensors:
        if with_layout:
            digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes (any dtype, any device)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


__all__ = ["data_fingerprint", "file_sha256", "json_sha256", "tensor_sha256"]


def tree_sha256(path: Path | str) -> str:
    """SHA-256 of a file, or of a directory's files (a Hugging Face model folder): sorted relative names and contents.

    Hidden entries (``.cache``, ``.git``) are left out, so reading a folder does not change its hash.
    """
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()
