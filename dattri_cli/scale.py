"""Which training rows this process scores, and where train-side blocks are kept.

Rows are split into contiguous blocks on training-batch boundaries: a shard (or a
rank) scores whole batches, so every per-batch computation is the one an
unsharded run does, and merged shards reproduce its bytes. Whatever needs the full
training set (Hessian, CG HVPs, the TRAK kernel) still sees all of it: the full
loader in a shard run, all-reduced partial sums in a distributed run.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.data import Split
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import BlockStore, train_fingerprint

#: attributors whose full-training-set quantities are all-reduced under torchrun
DISTRIBUTED_OK = (
    "TracInAttributor", "TRAKAttributor", "IFAttributorExplicit", "IFAttributorCG", "IFAttributorLiSSA",
    "IFAttributorArnoldi", "IFAttributorDataInf", "IFAttributorEKFAC", "IFAttributorKFAC", "RPSAttributor",
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
        return {"index": self.index, "count": self.count, "rows": [self.start, self.stop], "n_train": self.n_train}


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


def plan_rows(shard_cfg: Optional[Mapping[str, Any]], n_train: int, batch_size: int, rank: int = 0, world: int = 1) -> RowPlan:
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


def store_factory(root: Path, checkpoint_hashes: List[str], split: Split, layer_name: Any, dtype: torch.dtype, device: str, stats: Dict[str, List[BlockStore]]) -> Callable[..., BlockStore]:
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


def attribute_rows(attributor: Any, cache_loader: Any, rows_loader: Any, test_loader: Any, plan: RowPlan, timings: Dict[str, float]) -> torch.Tensor:
    """``cache`` on ``cache_loader`` then the scores of the plan's rows only."""
    first = next(iter(inspect.signature(attributor.attribute).parameters))
    if hasattr(attributor, "train_row_offset"):  # absolute row of the first sample it is given
        cached_side = first == "test_dataloader"  # TRAK: the rows come through cache()
        attributor.train_row_offset = plan.start if (plan.mode == "rank" or not cached_side) else 0
    from dattri_cli.pipeline import run_cache  # noqa: PLC0415 - pipeline imports this module

    run_cache(attributor, cache_loader, timings)
    start = time.perf_counter()
    if first == "test_dataloader":  # TRAK: the training set was cached
        if hasattr(attributor, "attribute_rows"):
            scores = attributor.attribute_rows(test_loader, plan.start, plan.stop)
        else:  # a class without row selection: compute all cached rows, keep ours
            offset = plan.start if plan.mode == "rank" else 0
            scores = attributor.attribute(test_loader)[plan.start - offset : plan.stop - offset]
    else:
        scores = attributor.attribute(rows_loader, test_loader)
    timings["attribute_s"] = time.perf_counter() - start
    return scores


def check_distributable(attributor: Any) -> None:
    """Refuse attributors whose full-training-set statistics are not all-reduced."""
    name = type(attributor).__name__
    if name not in DISTRIBUTED_OK:
        msg = f"{name} does not support torchrun (ranks splitting the training set); supported: {', '.join(DISTRIBUTED_OK)}. Use shard.index/shard.count instead"
        raise ConfigError(msg)
    if name == "IFAttributorArnoldi" and attributor.precompute_data_ratio != 1.0:
        msg = "IFAttributorArnoldi under torchrun needs precompute_data_ratio=1.0"
        raise ConfigError(msg)
