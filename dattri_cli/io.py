"""Score files: names, atomic writes, metadata, sidecars and reading back.

A score file is safetensors with tensors ``scores`` (float32, ``(n_train, n_test)``),
``train_indices`` and ``test_indices`` (int64, positions in the source dataset),
and ONE metadata key holding sorted JSON. With several metadata keys the header
order (hence the file bytes) can change between saves; one key keeps identical
runs byte-identical. Timings and hostnames go to a sidecar ``NAME.run.json`` beside ``NAME.safetensors``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from dattri_cli.errors import DattriError

log = logging.getLogger("dattri_cli")

SCHEMA_VERSION = 1
SCORES = "scores"
TRAIN_INDICES = "train_indices"
TEST_INDICES = "test_indices"
METADATA_KEY = "dattri_cli"
SIDECAR_NAME = "run.json"


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(path: Path, exc: BaseException) -> str | None:
    """``cannot write PATH: no space left ...`` for a full disk or file-size limit, else None."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return f"cannot write {path}: no space left on device; free some space or choose out=PATH on another disk"
    if code == errno.EFBIG or "File too large" in text:
        return (
            f"cannot write {path}: no space left under the file size limit (ulimit -f); raise the "
            "limit or choose a smaller output"
        )
    if code == errno.EDQUOT:
        return f"cannot write {path}: no space left in your disk quota; free some space or choose out=PATH elsewhere"
    return None


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename into place, so readers never see a partial file.

    The file gets the permissions a plain ``open`` would give (``0o666`` less the umask),
    not the ``0o600`` of the temporary file. A full disk or a file-size limit removes the
    partial temporary file and ends in one ``cannot write PATH: no space left`` line.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        msg = (
            write_failure(path, exc)
            or f"cannot write {path} ({exc.strerror or exc}); choose a writable out=PATH"
        )
        raise DattriError(msg) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as exc:
        msg = write_failure(path, exc)
        if msg is None:
            raise
        raise DattriError(msg) from exc
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

    if scores.shape != (train_indices.numel(), test_indices.numel()):
        msg = (
            f"scores shape {tuple(scores.shape)} does not match indices ({train_indices.numel()}, "
            f"{test_indices.numel()})"
        )
        raise ValueError(msg)
    tensors = {
        SCORES: scores.detach().to("cpu", torch.float32).contiguous(),
        TRAIN_INDICES: train_indices.detach().to("cpu", torch.int64).contiguous(),
        TEST_INDICES: test_indices.detach().to("cpu", torch.int64).contiguous(),
    }
    for name, tensor in (extra or {}).items():
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    write_tensor_file(Path(path), tensors, metadata)


def write_tensor_file(path: Path, tensors: Dict[str, Tensor], metadata: Dict[str, Any]) -> None:
    """Atomically write ``tensors`` with ``metadata`` as ONE sorted-JSON key (byte-stable)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    meta = {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **metadata}, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_tensor_file(path: Path, what: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Tensors and decoded metadata of a safetensors file; ``what`` names it in errors."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        msg = f"{what} not found: {path}"
        raise DattriError(msg)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open API
        meta = json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else None
    except Exception as exc:  # noqa: BLE001 - any parse failure means a malformed file
        msg = f"{path} is not a readable safetensors {what} ({exc})"
        raise DattriError(msg) from exc
    return tensors, meta


def load_scores(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a score file back: its tensors and its decoded metadata."""
    tensors, meta = read_tensor_file(path, "score file")
    missing = [k for k in (SCORES, TRAIN_INDICES, TEST_INDICES) if k not in tensors]
    if missing or meta is None:
        msg = f"{path} is not a dattri-cli score file (missing {missing or [METADATA_KEY]})"
        raise DattriError(msg)
    return tensors, meta


def sidecar_path(scores_path: Path) -> Path:
    """``NAME.run.json`` beside ``NAME.safetensors`` (``scores.run.json`` beside ``scores.safetensors``).

    Named after the score file, so two score files in one folder never share (and
    overwrite) one sidecar.
    """
    scores_path = Path(scores_path)
    return scores_path.parent / f"{scores_path.stem}.{SIDECAR_NAME}"


def write_sidecar(path: Path, info: Dict[str, Any]) -> None:
    """Write the non-reproducible run facts (timings, host, time) next to the scores."""
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def score_metadata(
    result_cfg: Mapping[str, Any],
    config_hash: str,
    attributor_cfg: Mapping[str, Any],
    runner: Mapping[str, Any],
    choices: Optional[Dict[str, str]],
    checkpoints: Sequence[Any],
    checkpoint_hashes: Sequence[str],
    diagnostics: Any,
) -> Dict[str, Any]:
    """Everything a score file depends on, for its single metadata key.

    ``result_cfg`` is the resolved config less the keys that never change the scores,
    ``checkpoints`` have ``path``, ``model_index`` and ``epoch``.
    """
    import dattri_cli  # noqa: PLC0415 - the package version

    return {
        "attributor": {
            "target": attributor_cfg["_target_"],
            "kwargs": {k: v for k, v in attributor_cfg.items() if not k.startswith("_")},
            "runner": dict(runner),
        },
        "choices": choices or {},
        "config": dict(result_cfg),
        "config_hash": config_hash,
        "seed": int(result_cfg.get("seed", 0)),
        "versions": {"dattri_cli": dattri_cli.__version__, "torch": torch.__version__},
        "checkpoints": [
            {"file": Path(c.path).name, "sha256": h, "model_index": c.model_index, "epoch": c.epoch}
            for c, h in zip(checkpoints, checkpoint_hashes)
        ],
        "diagnostics": json.loads(json.dumps(diagnostics, default=str)),
    }


def write_run_sidecar(out: Path, written: Any, config_hash: str, timings: Dict[str, Any]) -> None:
    """The sidecar ``NAME.run.json`` beside ``out``: what was written, timings, host, time, config hash."""
    info = {
        "scores": written,
        "timings": timings,
        "host": platform.node(),
        "finished_unix": time.time(),
        "config_hash": config_hash,
    }
    try:
        write_sidecar(sidecar_path(out), info)
    except DattriError as exc:
        what = f"{out} is complete"
        if not isinstance(written, str):
            what = f"all {len(written)} row-block files are complete"
        msg = f"the scores were written ({what}) but the sidecar was not: {exc}"
        raise DattriError(msg) from exc


# -- row-block shards ------------------------------------------------------------------

SHARD_KEY = "shard"


def shard_path(path: Path, index: int, count: int) -> Path:
    """``scores.safetensors`` -> ``scores-00002-of-00008.safetensors`` (same folder)."""
    path = Path(path)
    return path.parent / f"{path.stem}-{index:05d}-of-{count:05d}{path.suffix or '.safetensors'}"


def _expand(sources: Any) -> List[Path]:
    """Files, directories (their ``*-of-*.safetensors``) and glob patterns, sorted, deduplicated."""
    found: List[Path] = []
    for source in [sources] if isinstance(sources, (str, Path)) else list(sources):
        text = str(source)
        path = Path(text).expanduser()
        if path.is_dir():
            found.extend(sorted(path.glob("*-of-*.safetensors")))
        elif any(ch in text for ch in "*?["):
            found.extend(
                sorted(Path().glob(text))
                if not path.is_absolute()
                else sorted(Path(path.anchor).glob(str(path.relative_to(path.anchor))))
            )
        else:
            found.append(path)
    unique = sorted(set(found))
    if not unique:
        msg = f"no shard files found in {sources}"
        raise DattriError(msg)
    return unique


def _shard_header(path: Path) -> Tuple[int, int, Path, Dict[str, Any], Tensor, Set[str]]:
    """``(first row, stop row, path, metadata, test_indices, optional tensor names)`` of one shard file."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            test_indices = handle.get_tensor(TEST_INDICES)
            rows = handle.get_slice(SCORES).get_shape()[0]
            names = set(handle.keys()) - {SCORES, TRAIN_INDICES, TEST_INDICES}
    except Exception as exc:  # noqa: BLE001 - any parse failure means a malformed file
        msg = f"{path} is not a readable safetensors score file ({exc})"
        raise DattriError(msg) from exc
    if METADATA_KEY not in raw:
        msg = f"{path} is not a dattri-cli score file (no {METADATA_KEY} metadata)"
        raise DattriError(msg)
    meta = json.loads(raw[METADATA_KEY])
    shard = meta.get(SHARD_KEY)
    if not shard:
        msg = f"{path} is a complete score file, not a shard; nothing to merge"
        raise DattriError(msg)
    if rows != shard["rows"][1] - shard["rows"][0]:
        msg = f"{path} holds {rows} rows but its metadata says {shard['rows']}"
        raise DattriError(msg)
    return shard["rows"][0], shard["rows"][1], path, meta, test_indices, names


def _names_a_set(sources: Any) -> bool:
    """True for one folder or one glob pattern (what ``dattri merge DIR`` / ``show SHARD`` pass)."""
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if len(items) != 1:
        return False
    text = str(items[0])
    return Path(text).expanduser().is_dir() or any(ch in text for ch in "*?[")


def _sibling_shards(entries: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
    """Shards of the same job missing from ``entries``, found in sibling run folders.

    A candidate must carry the same config hash, shard count and training-set size;
    for an index found more than once, the newest file is taken. Each find is logged.
    """
    first = entries[0][3]
    shard = first[SHARD_KEY]
    count, have = int(shard["count"]), {int(e[3][SHARD_KEY]["index"]) for e in entries}
    if len(have) >= count:
        return []
    known = {e[2].resolve() for e in entries}
    candidates = []
    for parent in sorted({e[2].resolve().parent.parent for e in entries}):
        candidates += [p for p in parent.glob(f"*/*-of-{count:05d}.safetensors") if p.resolve() not in known]
    found = []
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            entry = _shard_header(path)
        except DattriError:
            continue
        meta = entry[3]
        index = int(meta[SHARD_KEY]["index"])
        if (
            index in have
            or meta.get("config_hash") != first.get("config_hash")
            or meta[SHARD_KEY].get("n_train") != shard.get("n_train")
        ):
            continue
        have.add(index)
        found.append(entry)
        log.info("shard %d of %d found beside the others: %s", index, count, path)
    return found


class ShardedScores:
    """A set of row-block shard files read lazily: headers now, score rows on demand.

    ``rows(start, stop)`` and ``column(j)`` open only the shards they need, so a
    score matrix larger than memory can be inspected piece by piece.
    """

    def __init__(self, sources: Any, find_siblings: bool = True) -> None:
        """Check that the shards belong together and cover the training rows exactly once.

        With ``find_siblings``, shards of the same job (same config hash and count) that
        are missing from ``sources`` are looked for in the sibling folders of the given
        files' folders, when ``sources`` names one folder or pattern (not a list of
        files): ``shard.index=i`` runs without ``out=`` land in one timestamped
        run folder each, side by side under ``outputs/<date>/``.
        """
        self.paths = _expand(sources)
        entries = [_shard_header(path) for path in self.paths]
        if find_siblings and _names_a_set(sources):  # explicit file lists are taken as given
            found = _sibling_shards(entries)
            entries += found
            self.paths = sorted(self.paths + [e[2] for e in found])
        per_row: Optional[Set[str]] = None  # optional tensor names held by every shard
        for entry in entries:
            per_row = entry[5] if per_row is None else per_row & entry[5]
        entries = [e[:5] for e in entries]
        entries.sort(key=lambda e: (e[0], e[1]))
        first = entries[0][3]
        for _start, _stop, path, meta, test_indices in entries:
            if meta.get("config_hash") != first.get("config_hash"):
                msg = (
                    f"{path} belongs to config {str(meta.get('config_hash'))[:12]}, not "
                    f"{str(first.get('config_hash'))[:12]} like {entries[0][2]}; shards of different "
                    "runs cannot be merged"
                )
                raise DattriError(msg)
            if meta[SHARD_KEY]["n_train"] != first[SHARD_KEY]["n_train"] or not torch.equal(
                test_indices, entries[0][4]
            ):
                msg = f"{path} has a different train or test set than {entries[0][2]}"
                raise DattriError(msg)
        n_train = int(first[SHARD_KEY]["n_train"])
        expected = 0
        for start, stop, path, _, _ in entries:
            if start != expected:
                what = "overlap" if start < expected else "a gap"
                msg = (
                    f"shards do not cover the training rows exactly once: {what} at row "
                    f"{min(start, expected)} ({path}); give every shard exactly once"
                )
                raise DattriError(msg)
            expected = stop
        if expected != n_train:
            msg = (
                f"shards cover rows 0-{expected} of {n_train}: rows {expected}-{n_train} are missing; "
                "run the missing shard(s)"
            )
            raise DattriError(msg)
        self.entries = [(start, stop, path) for start, stop, path, _, _ in entries]
        #: optional per-row tensors every shard holds (e.g. ``self_influence``)
        self.extra_names = sorted(per_row or ())
        self.metadata = {k: v for k, v in first.items() if k not in (SHARD_KEY, "schema_version")}
        self.test_indices = entries[0][4]
        self.shape = (n_train, int(self.test_indices.numel()))

    def _read(self, path: Path, key: str, rows: Optional[slice] = None, cols: Any = slice(None)) -> Tensor:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as handle:
            if rows is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[rows, cols]

    @property
    def train_indices(self) -> Tensor:
        """Train indices of all rows, in row order."""
        return torch.cat([self._read(p, TRAIN_INDICES) for _, _, p in self.entries])

    def rows(self, start: int, stop: int) -> Tensor:
        """Score rows ``[start, stop)``, reading only the shards that hold them."""
        parts = []
        for lo, hi, path in self.entries:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                parts.append(self._read(path, SCORES, slice(a - lo, b - lo)))
        return torch.cat(parts) if parts else torch.zeros(0, self.shape[1])

    def column(self, j: int) -> Tensor:
        """All training scores of test column ``j``."""
        return torch.cat(
            [self._read(p, SCORES, slice(None), slice(j, j + 1)).flatten() for _, _, p in self.entries]
        )

    def extra(self, name: str) -> Tensor:
        """The per-row tensor ``name`` (one of :attr:`extra_names`) of all rows, in row order."""
        return torch.cat([self._read(p, name) for _, _, p in self.entries])

    def load(self) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """The whole set in memory, as :func:`load_scores` returns a single file."""
        tensors = {
            SCORES: self.rows(0, self.shape[0]),
            TRAIN_INDICES: self.train_indices,
            TEST_INDICES: self.test_indices,
        }
        tensors.update({name: self.extra(name) for name in self.extra_names})
        return tensors, dict(self.metadata)


def open_score_set(sources: Any) -> ShardedScores:
    """Lazily open shard files (paths, a directory or a glob): for ``dattri show`` and ``eval``."""
    return ShardedScores(sources)


def is_score_set(path: Path) -> bool:
    """True for what names a shard set: a folder, a glob, or one shard file (``*-of-*``)."""
    path = Path(path)
    return path.is_dir() or any(ch in str(path) for ch in "*?[") or "-of-" in path.name


def score_set_source(path: Path) -> str:
    """What :func:`open_score_set` is given for ``path``; one shard's name stands for its whole set."""
    path = Path(path)
    if path.is_file():  # scores-00001-of-00004 -> scores-*-of-00004
        return str(path.parent / re.sub(r"-\d+-of-(\d+)", r"-*-of-\1", path.name))
    return str(path)


def _is_shard_file(path: Path) -> bool:
    """True when the file's metadata (header only) has a ``shard`` entry."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
        return raw is not None and SHARD_KEY in json.loads(raw)
    except Exception:  # noqa: BLE001 - load_scores reports an unreadable file
        return False


def load_score_set(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """A score file, or a shard set assembled in memory (its metadata without the ``shard`` entry)."""
    path = Path(path)
    if not is_score_set(path) or (path.is_file() and not _is_shard_file(path)):
        return load_scores(path)
    return open_score_set(score_set_source(path)).load()


def merge_shards(sources: Any, out: Path, overwrite: bool = True) -> Path:
    """Check that the shards cover the training set once under one config hash, then write ``out``."""
    shards = ShardedScores(sources)
    out = Path(out).expanduser()
    check_writable(out, overwrite=overwrite)
    tensors, metadata = shards.load()
    extra = {name: tensors[name] for name in shards.extra_names}
    save_scores(out, tensors[SCORES], tensors[TRAIN_INDICES], tensors[TEST_INDICES], metadata, extra)
    return out
