"""Running an attributor over training rows: ``scores[rows] = score_rows(rows, test)`` block by block.

Which rows this process scores (all, a shard, a torchrun rank's), in how many files
(one unless ``output.rows_per_file`` or the memory estimate asks for row blocks),
and the execution itself: :func:`score_blocks` prepares the attributor once and
yields the scores of one block at a time, through the contract of
:class:`dattri_cli.algorithm.base.Attributor` (no probing of the instance).

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
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor, TestSideMemo, TrainRows
from dattri_cli.data import protocol
from dattri_cli.errors import ConfigError

log = logging.getLogger("dattri_cli")


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


def row_loader(split: Any, start: int, stop: int, batch_size: int) -> DataLoader:
    """An unshuffled loader over train rows ``[start, stop)``, batched like the full one (any split type)."""
    return protocol.row_loader(split, start, stop, batch_size)


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


def score_bytes(attributor: Attributor, param_dtype: torch.dtype) -> int:
    """Bytes held per score while a file is produced: output, serialised copy and the attributor's accumulator."""
    dtype = attributor.accumulator_dtype or param_dtype
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
def remember_test_side(attributor: Attributor) -> Iterator[None]:
    """Keep the attributor's test side per checkpoint for the duration (if it can), then drop it."""
    if not attributor.keeps_test_side:
        yield
        return
    attributor.test_side_memo = TestSideMemo()
    try:
        yield
    finally:
        attributor.test_side_memo = None


# -- execution ----------------------------------------------------------------------------------


def prepare(attributor: Attributor, loader: DataLoader, row_offset: int, timings: Dict[str, float]) -> None:
    """``attributor.prepare(loader, row_offset)``, timed into ``timings["cache_s"]``."""
    start = time.perf_counter()
    attributor.prepare(loader, row_offset)
    timings["cache_s"] = time.perf_counter() - start


def score(
    attributor: Attributor, rows: TrainRows, test_loader: DataLoader, timings: Dict[str, float]
) -> torch.Tensor:
    """The scores of ``rows`` as float32 on the CPU, the time added to ``timings["attribute_s"]``."""
    start = time.perf_counter()
    scores = attributor.score_rows(rows, test_loader).detach().to("cpu", torch.float32)
    timings["attribute_s"] = timings.get("attribute_s", 0.0) + time.perf_counter() - start
    return scores


def score_blocks(
    attributor: Attributor,
    split: Any,
    loaders: Tuple[DataLoader, DataLoader],
    plan: RowPlan,
    blocks: List[RowPlan],
    timings: Dict[str, float],
) -> Iterator[Tuple[RowPlan, torch.Tensor]]:
    """Prepare once, then yield ``(block, float32 scores of its rows)`` for each block, in order.

    The attributor is prepared on the full training set (a single file, a shard, row
    blocks), or under torchrun on this rank's rows inside
    :func:`dattri_cli.distributed.split_reductions`, so its full-set sums are all-reduced.
    With several blocks the test side is computed on the first and kept for the others;
    whatever the caller does between blocks (metadata, self-influence) sees that state.
    """
    train_loader, test_loader = loaders
    timings["attribute_s"] = 0.0
    if plan.mode == "rank":
        attributor.check_rank_split()
        rows_loader = row_loader(split, plan.start, plan.stop, int(train_loader.batch_size))
        with distributed.split_reductions():
            prepare(attributor, rows_loader, plan.start, timings)
            scores = score(attributor, TrainRows(rows_loader, plan.start, plan.stop), test_loader, timings)
        yield plan, scores
        return
    prepare(attributor, train_loader, 0, timings)
    with contextlib.ExitStack() as stack:
        if len(blocks) > 1:
            stack.enter_context(remember_test_side(attributor))
        for block in blocks:
            if block.mode == "full":
                rows = TrainRows(train_loader, 0, block.n_train)
            else:
                loader = row_loader(split, block.start, block.stop, int(train_loader.batch_size))
                rows = TrainRows(loader, block.start, block.stop)
            scores = score(attributor, rows, test_loader, timings)
            yield block, scores
            del scores  # one block in memory at a time
