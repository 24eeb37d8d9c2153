"""What a batch is: a tensor, a tuple or list of them, or a dictionary of them.

Loaders yield batches of any of these shapes (``(x, y)`` from a ``TensorDataset``,
``{"input_ids": ..., "labels": ...}`` from a text pipeline, a bare tensor) and the
user's functions unpack them as they were yielded. The helpers here move, resize,
concatenate and index such batches without caring which shape they have; every
tensor leaf shares the leading batch dimension. Non-tensor leaves pass through.

Two calling conventions exist for per-sample functions (dattri's, kept exactly):

* :data:`SAMPLE_IN_DIMS` ``(None, 0)``: the function sees one sample *without* a
  batch dimension (TracIn, Grad-Dot, Grad-Cos, TRAK);
* :data:`BATCH_OF_ONE_IN_DIMS` ``(None, 1)``: the batch is first given a leading
  dimension of one (:func:`add_leading_dim`) and the function sees each sample as a
  batch of one (the influence-function attributors, whose Hessians use the same
  function on whole batches).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

Batch = Union[Tensor, Sequence[Any], dict]

#: vmap ``in_dims`` for ``f(params, sample)`` on samples without a batch dimension
SAMPLE_IN_DIMS: Tuple[None, int] = (None, 0)
#: vmap ``in_dims`` for ``f(params, batch_of_one)`` on a batch given a leading dimension of one
BATCH_OF_ONE_IN_DIMS: Tuple[None, int] = (None, 1)


def map_tensors(func: Callable[[Tensor], Any], batch: Any) -> Any:
    """Apply ``func`` to every tensor leaf; tuples stay tuples, lists lists, dicts dicts."""
    if isinstance(batch, Tensor):
        return func(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(func, value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(func, value) for value in batch)
    return batch


def tensor_leaves(batch: Any) -> List[Tensor]:
    """The tensor leaves of a batch, in order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for value in batch.values() for t in tensor_leaves(value)]
    if isinstance(batch, (tuple, list)):
        return [t for value in batch for t in tensor_leaves(value)]
    return []


def to_device(batch: Any, device: Union[str, torch.device]) -> Any:
    """A batch on ``device``; a list becomes a tuple (as dattri passes batches on)."""
    moved = map_tensors(lambda t: t.to(device), batch)
    return tuple(moved) if isinstance(moved, list) else moved


def batch_size_of(batch: Any) -> int:
    """The leading dimension shared by the batch's tensors."""
    leaves = tensor_leaves(batch)
    if not leaves:
        msg = "a batch must hold at least one tensor"
        raise TypeError(msg)
    return int(leaves[0].shape[0])


def add_leading_dim(batch: Any) -> Any:
    """Every tensor gets a new leading dimension of one: ``(B, ...) -> (1, B, ...)``."""
    return map_tensors(lambda t: t.unsqueeze(0), batch)


def index_batch(batch: Any, index: Union[Tensor, slice]) -> Any:
    """The samples ``index`` (rows of every tensor leaf)."""
    return map_tensors(lambda t: t[index], batch)


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same shape along the sample dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches))
    if isinstance(first, dict):
        return {key: concat_batches([b[key] for b in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


class FirstBatches:
    """The first ``count`` batches of a loader; every pass starts afresh, like the loader."""

    def __init__(self, loader: Any, count: int) -> None:
        """Keep ``loader`` and how many of its batches to yield."""
        self.loader, self.count = loader, int(count)

    def __iter__(self) -> Any:
        """The first ``count`` batches of a new pass over the loader."""
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        """Number of batches a pass yields."""
        return min(self.count, len(self.loader))


def first_batches(loader: Any, count: int) -> Any:
    """``loader`` itself when ``count`` covers it, else its first ``count`` batches."""
    return loader if count >= len(loader) else FirstBatches(loader, count)
