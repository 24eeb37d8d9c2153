"""Which training rows this process scores, and where train-side blocks are kept.

Rows are split into contiguous blocks on training-batch boundaries: a shard (or a
rank) scores whole batches, so every per-batch computation is the one an
unsharded run does, and merged shards reproduce its bytes. Whatever needs the full
training set (Hessian, CG HVPs, the TRAK kernel) still sees all of it: the full
loader in a shard run, all-reduced partial sums in a distributed run.

One run can also write its rows as several files (``output.rows_per_file``): it
caches once, then scores and writes one block of rows at a time, so memory holds
one block of the score matrix, never all of it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.data import Split
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import BlockStore, train_fingerprint

log = logging.getLogger("dattri_cli")

#: attributors whose full-training-set quantities are all-reduced under torchrun
DISTRIBUTED_OK = (
    "TracInAttributor",
    "TRAKAttributor",
    "IFAttributorExplicit",
    "IFAttributorCG",
    "IFAttributorLiSSA",
    "IFAttributorArnoldi",
    "IFAttributorDataInf",
    "IFAttributorEKFAC",
    "IFAttributorKFAC",
    "RPSAttributor",
)


@dataclass
class RowPlan:
    """Train rows ``[start, stop)`` of ``n_train`` scored here; ``index`` of ``count`` parts."""

    index: int
    count: int
    start: int
    stop: int
    n_train: int
    mode: str  # "full" | "shard" | "rank"

    @property
    def partial(self) -> bool:
        """True unless this process scores every row."""
        return self.mode != "full"

    def metadata(self) -> Dict[str, Any]:
        """What a shard file records about its rows."""
        return {
            "index": self.index,
            "count": self.count,
            "rows": [self.start, self.stop],
            "n_train": self.n_train,
        }


def block_rows(n_train: int, batch_size: int, index: int, count: int) -> tuple:
    """Rows of part ``index`` of ``count``: a contiguous run of whole batches."""
    num_batches = math.ceil(n_train / batch_size)
    if count > num_batches:
        msg = (
            f"{count} parts but only {num_batches} training batches of {batch_size}; "
            "lower shard.count (or the number of processes) or loader.train_batch_size"
        )
        raise ConfigError(msg)
    first, last = index * num_batches // count, (index + 1) * num_batches // count
    return first * batch_size, min(last * batch_size, n_train)


def plan_rows(
    shard_cfg: Optional[Mapping[str, Any]], n_train: int, batch_size: int, rank: int = 0, world: int = 1
) -> RowPlan:
    """The rows this process scores, from ``shard.index``/``shard.count`` or the rank."""
    shard_cfg = shard_cfg or {}
    count = int(shard_cfg.get("count") or 1)
    index = shard_cfg.get("index")
    if world > 1:
        if count > 1 or index is not None:
            msg = "shard.* and torchrun split the training set each; use one of them (unset shard.index/shard.count)"
            raise ConfigError(msg)
        start, stop = block_rows(n_train, batch_size, rank, world)
        return RowPlan(rank, world, start, stop, n_train, "rank")
    if index is None and count == 1:
        return RowPlan(0, 1, 0, n_train, n_train, "full")
    if index is None or count < 1 or not 0 <= int(index) < count:
        msg = f"shard.index must be one of 0..{count - 1} for shard.count={count}, got {index}"
        raise ConfigError(msg)
    start, stop = block_rows(n_train, batch_size, int(index), count)
    return RowPlan(int(index), count, start, stop, n_train, "shard")


def row_loader(split: Split, start: int, stop: int, batch_size: int) -> DataLoader:
    """An unshuffled loader over train rows ``[start, stop)``, batched like the full one."""
    data = TensorDataset(split.x_train[start:stop], split.y_train[start:stop])
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def store_factory(
    root: Path,
    checkpoint_hashes: List[str],
    split: Split,
    layer_name: Any,
    dtype: torch.dtype,
    device: str,
    stats: Dict[str, List[BlockStore]],
) -> Callable[..., BlockStore]:
    """``f(kind, ckpt_idx, extra) -> BlockStore`` keyed by what determines the blocks."""
    fingerprint = train_fingerprint(split.x_train, split.y_train, split.train_indices)

    def make(kind: str, ckpt_idx: int, extra: Mapping[str, Any]) -> BlockStore:
        parts = {
            "checkpoint_sha256": checkpoint_hashes[ckpt_idx],
            "train_data": fingerprint,
            "layer_name": layer_name,
            "dtype": str(dtype),
            "device_type": torch.device(device).type,
            **extra,
        }
        store = BlockStore.keyed(root, kind, parts)
        stats.setdefault(kind, []).append(store)
        return store

    return make


def _scores_cached_side(attributor: Any) -> bool:
    """True for TRAK-like classes: ``attribute(test_dataloader)`` scores the rows given to ``cache``."""
    return next(iter(inspect.signature(attributor.attribute).parameters)) == "test_dataloader"


def align_row_offset(attributor: Any, plan: RowPlan) -> None:
    """Tell the attributor the absolute train row of the first sample it will be given."""
    if hasattr(attributor, "train_row_offset"):
        cached_side = _scores_cached_side(attributor)  # TRAK: the rows come through cache()
        attributor.train_row_offset = plan.start if (plan.mode == "rank" or not cached_side) else 0


def score_rows(attributor: Any, rows_loader: Any, test_loader: Any, plan: RowPlan) -> torch.Tensor:
    """The scores of the plan's rows, ``cache`` having been run already."""
    align_row_offset(attributor, plan)
    if not _scores_cached_side(attributor):
        return attributor.attribute(rows_loader, test_loader)
    if hasattr(attributor, "attribute_rows"):
        return attributor.attribute_rows(test_loader, plan.start, plan.stop)
    offset = plan.start if plan.mode == "rank" else 0  # no row selection: compute all cached rows, keep ours
    return attributor.attribute(test_loader)[plan.start - offset : plan.stop - offset]


def attribute_rows(
    attributor: Any,
    cache_loader: Any,
    rows_loader: Any,
    test_loader: Any,
    plan: RowPlan,
    timings: Dict[str, float],
) -> torch.Tensor:
    """``cache`` on ``cache_loader`` then the scores of the plan's rows only."""
    align_row_offset(attributor, plan)
    from dattri_cli.pipeline import run_cache  # noqa: PLC0415 - pipeline imports this module

    run_cache(attributor, cache_loader, timings)
    start = time.perf_counter()
    scores = score_rows(attributor, rows_loader, test_loader, plan)
    timings["attribute_s"] = time.perf_counter() - start
    return scores


def check_distributable(attributor: Any) -> None:
    """Refuse attributors whose full-training-set statistics are not all-reduced."""
    name = type(attributor).__name__
    if name not in DISTRIBUTED_OK:
        msg = (
            f"{name} does not support torchrun (ranks splitting the training set); supported: "
            f"{', '.join(DISTRIBUTED_OK)}. Use shard.index/shard.count instead"
        )
        raise ConfigError(msg)
    if name == "IFAttributorArnoldi" and attributor.precompute_data_ratio != 1.0:
        msg = "IFAttributorArnoldi under torchrun needs precompute_data_ratio=1.0"
        raise ConfigError(msg)


# -- several score files from one run -----------------------------------------------------

#: ``output.rows_per_file`` value that decides from the available memory
AUTO = "auto"
#: share of the available memory the score matrix may take before ``auto`` writes row blocks
MEMORY_FRACTION = 0.5
#: bytes per score besides the attributor's accumulator: the float32 matrix and its serialised copy
OUTPUT_BYTES_PER_SCORE = 8


def parse_rows_per_file(value: Any) -> Optional[int]:
    """``output.rows_per_file`` as a positive row count, or None for ``auto``."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text == AUTO:
        return None
    if text is not None and text.isdigit():
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"output.rows_per_file must be auto or a positive number of training rows per score file, got {value!r}"
        raise ConfigError(msg)
    return value


def rows_per_file_setting(
    output_cfg: Optional[Mapping[str, Any]], shard_cfg: Optional[Mapping[str, Any]], world: int
) -> Optional[int]:
    """The checked ``output.rows_per_file`` (None: auto).

    Refused with shard.* or torchrun, which split the rows themselves.
    """
    rows = parse_rows_per_file((output_cfg or {}).get("rows_per_file", AUTO))
    if rows is None:
        return None
    shard_cfg = shard_cfg or {}
    if world > 1:
        msg = (
            "output.rows_per_file cannot be combined with torchrun (rank 0 writes one file); "
            "leave it at auto, or use shard.index/shard.count in separate runs"
        )
        raise ConfigError(msg)
    if shard_cfg.get("index") is not None or int(shard_cfg.get("count") or 1) > 1:
        msg = (
            "output.rows_per_file and shard.index/shard.count both split the training rows into files; "
            "use one of them (raise shard.count for smaller shards)"
        )
        raise ConfigError(msg)
    return rows


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """``MemAvailable`` of ``meminfo`` in bytes, or None where it cannot be read (not Linux, old kernel)."""
    try:
        lines = Path(meminfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "MemAvailable:" and fields[1].isdigit():
            return int(fields[1]) * 1024  # the kernel reports kB
    return None


def score_bytes(attributor: Any, param_dtype: torch.dtype) -> int:
    """Bytes held per score while a file is produced: output, serialised copy and the attributor's accumulator."""
    dtype = getattr(attributor, "accumulator_dtype", param_dtype)
    return OUTPUT_BYTES_PER_SCORE + torch.empty((), dtype=dtype).element_size()


def _size(num_bytes: float) -> str:
    """``1536 * 2**20`` -> ``"1.5 GiB"``."""
    for unit, unit_bytes in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= unit_bytes:
            return f"{num_bytes / unit_bytes:.1f} {unit}"
    return f"{num_bytes / 2**10:.1f} KiB"


def _auto_rows(need: int, memory: Optional[int], n_test: int, bytes_per_score: int) -> Optional[int]:
    """Rows per file under ``auto``: None (one file) unless ``need`` bytes exceed the memory budget."""
    if memory is None or need <= memory * MEMORY_FRACTION:
        return None
    return max(1, int(memory * MEMORY_FRACTION) // max(1, n_test * bytes_per_score))


def _warn_one_file(plan: RowPlan, need: int, memory: int) -> None:
    """A shard or a torchrun job keeps one file; say so when it may not fit."""
    if plan.mode == "rank":
        advice = "rank 0 gathers every row; run shards (shard.index/shard.count) instead, each holding only its rows"
    else:
        advice = "raise shard.count for smaller shards"
    log.warning(
        "the score matrix needs about %s but %s of memory is available; %s",
        _size(need),
        _size(memory),
        advice,
    )


def plan_files(
    rows_per_file: Optional[int],
    plan: RowPlan,
    batch_size: int,
    n_test: int,
    bytes_per_score: int,
    memory: Optional[int],
) -> List[RowPlan]:
    """The row blocks this process writes, one file each: ``[plan]`` for a single file.

    ``rows_per_file=None`` (auto) keeps one file unless the estimated matrix exceeds
    :data:`MEMORY_FRACTION` of ``memory`` (unknown: one file). Blocks are whole training
    batches (at least one) laid out like ``shard.count`` shards, so every file equals
    the shard file of that index. Shards and torchrun ranks keep one file (a warning
    when it may not fit).
    """
    held = (plan.stop - plan.start) if plan.mode == "shard" else plan.n_train  # rank 0 gathers every row
    need = held * n_test * bytes_per_score
    auto_rows = _auto_rows(need, memory, n_test, bytes_per_score)
    if plan.mode != "full":
        if auto_rows is not None and (plan.mode == "shard" or plan.index == 0):  # rank 0 only says it
            _warn_one_file(plan, need, memory or 0)
        return [plan]
    if rows_per_file is not None:
        reason = f"output.rows_per_file={rows_per_file}"
    elif auto_rows is not None:
        rows_per_file = auto_rows
        reason = (
            f"the score matrix needs about {_size(need)}, more than {MEMORY_FRACTION:.0%} of the "
            f"{_size(memory or 0)} available"
        )
    else:
        return [plan]
    count = math.ceil(math.ceil(plan.n_train / batch_size) / max(1, rows_per_file // batch_size))
    if count == 1:
        return [plan]
    blocks = [
        RowPlan(i, count, *block_rows(plan.n_train, batch_size, i, count), plan.n_train, "shard")
        for i in range(count)
    ]
    largest = max(b.stop - b.start for b in blocks)
    log.info(
        "writing the scores as %d row-block files of at most %d rows (%s); `dattri merge` joins them",
        count,
        largest,
        reason,
    )
    return blocks


@contextlib.contextmanager
def remember_test_side(attributor: Any) -> Iterator[None]:
    """Keep the attributor's test side per checkpoint for the duration (if it can), then drop it."""
    if not hasattr(attributor, "test_side_memo"):
        yield
        return
    from dattri_cli.algorithm.base import TestSideMemo  # noqa: PLC0415

    attributor.test_side_memo = TestSideMemo()
    try:
        yield
    finally:
        attributor.test_side_memo = None
