"""Row chunks of a right-hand side under a memory budget.

A solver that treats the rows of ``rhs`` (``(k, P)``: ``k`` test gradients) one by
one, ``X = f(rhs)`` with ``X[i] = f(rhs[i])`` (batched conjugate gradients, an HVP
``vmap``-ed over test vectors, LiSSA), needs working memory ``k * bytes_per_row``
when run on all rows at once. :func:`map_row_chunks` runs it on chunks of
``rows_per_chunk(bytes_per_row, budget)`` rows and concatenates, so the peak is
about ``budget`` whatever ``k``. For a function whose rows are computed
independently the result is the same bit for bit; the chunk size depends only on
the budget and the row size, never on the data.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from dattri_cli.errors import ConfigError


def rows_per_chunk(bytes_per_row: int, budget: int) -> int:
    """How many rows of ``bytes_per_row`` working bytes fit in ``budget`` bytes (at least 1)."""
    if bytes_per_row <= 0 or budget <= 0:
        msg = f"bytes_per_row and budget must be positive, got {bytes_per_row} and {budget}"
        raise ConfigError(msg)
    return max(1, int(budget) // int(bytes_per_row))


def map_row_chunks(
    fn: Callable[[Tensor], Tensor],
    rhs: Tensor,
    budget: int,
    bytes_per_row: Optional[int] = None,
) -> Tensor:
    """``fn(rhs)`` computed on row chunks that each stay under ``budget`` bytes, concatenated.

    ``bytes_per_row`` is the solver's working memory per right-hand side (default: the
    size of one row of ``rhs``; pass a multiple for solvers that keep several vectors
    per row, e.g. about 4 for conjugate gradients). ``fn`` must map ``(c, ...)`` rows to
    ``(c, ...)`` results. A single chunk calls ``fn(rhs)`` unchanged.
    """
    if rhs.dim() == 0:
        msg = "map_row_chunks needs a tensor with a row dimension"
        raise ValueError(msg)
    row_bytes = bytes_per_row if bytes_per_row is not None else rhs[0].numel() * rhs.element_size()
    step = rows_per_chunk(max(1, row_bytes), budget)
    if step >= rhs.shape[0]:
        return fn(rhs)
    parts = []
    for start in range(0, rhs.shape[0], step):
        out = fn(rhs[start : start + step])
        if out.shape[0] != min(step, rhs.shape[0] - start):
            msg = f"fn returned {out.shape[0]} rows for a chunk of {min(step, rhs.shape[0] - start)}"
            raise ValueError(msg)
        parts.append(out)
    return torch.cat(parts, dim=0)
