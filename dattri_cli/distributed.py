"""torch.distributed glue: ranks split the training set, full-set sums are all-reduced.

``torchrun --nproc_per_node=K -m dattri_cli run ...`` sets ``WORLD_SIZE``/``RANK``;
:func:`init_from_env` then joins the process group (gloo on CPU, NCCL on CUDA).
Each rank attributes a contiguous block of training rows. Quantities defined over
the whole training set (Hessian-vector products, dense Hessians, the TRAK kernel)
are sums over samples; inside :func:`split_reductions` the functions computing
them call :func:`reduce_sum`, which all-reduces across ranks. Outside that
context (and in a single process) :func:`reduce_sum` is the identity, so the
Python API never talks to a process group it did not ask for.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Tuple

import torch
from torch import Tensor

_SPLIT = False


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """True when started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> Tuple[int, int]:
    """Join the process group torchrun describes; returns ``(rank, world_size)``."""
    import torch.distributed as dist  # noqa: PLC0415

    if not launched():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world()


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices are unchanged."""
    if launched() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


@contextlib.contextmanager
def split_reductions() -> Iterator[None]:
    """Within this block, :func:`reduce_sum` sums over ranks (each holds part of the data)."""
    global _SPLIT  # noqa: PLW0603 - one process-wide switch
    previous, _SPLIT = _SPLIT, True
    try:
        yield
    finally:
        _SPLIT = previous


def reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks when the training set is split across them, else return it."""
    rank, size = world()
    if not _SPLIT or size == 1:
        return tensor
    import torch.distributed as dist  # noqa: PLC0415

    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@contextlib.contextmanager
def local_reductions() -> Iterator[None]:
    """Within this block :func:`reduce_sum` is the identity again (every rank holds all the rows it sums)."""
    global _SPLIT  # noqa: PLW0603 - one process-wide switch
    previous, _SPLIT = _SPLIT, False
    try:
        yield
    finally:
        _SPLIT = previous


def _split_world() -> bool:
    return _SPLIT and world()[1] > 1


def _gather_variable(block: Tensor) -> List[Tensor]:
    """Every rank's ``block`` (same trailing shape, any number of rows), in rank order, on every rank."""
    import torch.distributed as dist  # noqa: PLC0415

    size = world()[1]
    mine = torch.tensor([block.shape[0]], dtype=torch.int64, device=block.device)
    counts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(counts, mine)
    rows = [int(c.item()) for c in counts]
    padded = torch.zeros((max(rows), *block.shape[1:]), dtype=block.dtype, device=block.device)
    padded[: block.shape[0]] = block
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return [part[:n] for part, n in zip(parts, rows)]


def all_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank concatenated in rank order (= global row order); ``tensor`` in one process."""
    if not _split_world():
        return tensor
    return torch.cat(_gather_variable(tensor))


class OrderedSum:
    """A sum over training chunks (loader batches) folded in global chunk order, whatever the world size.

    ``add`` each chunk's partial sum in loader order; :meth:`result` is
    ``init + p_0 + p_1 + ...`` added left to right over the chunks of *all* ranks in
    global row order. One process folds as it goes (the bits of a plain loop). Under
    :func:`split_reductions` each rank keeps its partials; then rank 0 folds its own
    and broadcasts the running sum, rank 1 continues from it and broadcasts, and so
    on, so every rank ends with the one-process bits however many ranks there are,
    as long as rank spans are whole loader batches (:func:`runner.block_rows`).
    Memory: under torchrun a rank holds one partial per training batch of its rows.
    """

    def __init__(self, init: "Tensor | None" = None) -> None:
        """Start from ``init`` (e.g. zeros, to reproduce an in-place ``total += part`` loop), or from the first part."""
        self.split = _split_world()
        self.total = init
        self.parts: List[Tensor] = []

    def add(self, part: Tensor) -> None:
        """Add the partial sum of the next chunk of this rank's rows."""
        if self.split:
            self.parts.append(part.detach().clone())
        else:
            self.total = part if self.total is None else self.total + part

    def result(self) -> "Tensor | None":
        """The fold over all chunks (None when nothing was added and there is no ``init``)."""
        if not self.split:
            return self.total
        import torch.distributed as dist  # noqa: PLC0415

        rank, size = world()
        if not self.parts:  # runner.block_rows gives every rank at least one batch
            msg = "a rank holds no training batch; lower the number of processes"
            raise ValueError(msg)
        total = self.total
        for src in range(size):  # the running sum passes through the ranks in row order
            if rank == src:
                for part in self.parts:
                    total = part if total is None else total + part
                buffer = total.contiguous()
            else:
                buffer = torch.empty_like(self.parts[0])
            dist.broadcast(buffer, src=src)
            total = buffer
        self.parts = []
        return total


def reduce_count(count: int, device: str = "cpu") -> int:
    """Sum an integer sample count over ranks (see :func:`reduce_sum`)."""
    if not _SPLIT or world()[1] == 1:
        return count
    return int(reduce_sum(torch.tensor([count], dtype=torch.int64, device=device)).item())


def row_span(count: int, device: str = "cpu") -> Tuple[int, int]:
    """``(offset, total)``: this rank's first global training row and the rows over all ranks.

    Ranks hold contiguous row blocks in rank order, so the offset is the sum of the
    lower ranks' counts (an all-gather of the counts; it draws no random numbers).
    Outside :func:`split_reductions` (and in one process) it is ``(0, count)``.
    """
    rank, size = world()
    if not _SPLIT or size == 1:
        return 0, count
    import torch.distributed as dist  # noqa: PLC0415

    mine = torch.tensor([count], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(counts, mine)
    per_rank = [int(c.item()) for c in counts]
    return sum(per_rank[:rank]), sum(per_rank)


def gather_rows(block: Tensor) -> List[Tensor]:
    """Every rank's row block, in rank order, on rank 0 (an empty list elsewhere)."""
    import torch.distributed as dist  # noqa: PLC0415

    rank, size = world()
    if size == 1:
        return [block]
    parts: List[object] = [None] * size if rank == 0 else []
    dist.gather_object(block.cpu(), parts if rank == 0 else None, dst=0)
    return [p for p in parts if p is not None]  # type: ignore[misc]


def shutdown() -> None:
    """Leave the process group cleanly at the end of a torchrun job (a no-op otherwise).

    Every rank waits for the others first: a rank tearing gloo down while another is
    still finishing can abort that process at exit.
    """
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks (no-op in one process)."""
    import torch.distributed as dist  # noqa: PLC0415

    if world()[1] > 1:
        dist.barrier()
