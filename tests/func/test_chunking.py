"""map_row_chunks: chunked results equal unchunked ones; chunk sizes follow the budget."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from dattri_cli.errors import ConfigError
from dattri_cli.func.chunking import map_row_chunks, rows_per_chunk


def test_rows_per_chunk():
    assert rows_per_chunk(100, 1000) == 10
    assert rows_per_chunk(100, 1099) == 10
    assert rows_per_chunk(5000, 1000) == 1  # one row over budget still runs, alone
    with pytest.raises(ConfigError):
        rows_per_chunk(0, 10)
    with pytest.raises(ConfigError):
        rows_per_chunk(10, 0)


def row_solver(v: torch.Tensor) -> torch.Tensor:
    """Row-independent and nonlinear: a few damped fixed-point steps per row."""
    x = torch.zeros_like(v)
    for _ in range(5):
        x = v - 0.3 * torch.tanh(x) * x.cumsum(-1) / (1 + x.abs().sum(-1, keepdim=True))
    return x


def test_chunked_equals_unchunked_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    rhs = torch.randn(37, 50, generator=g)
    whole = row_solver(rhs)
    sizes = []

    def recording(chunk: torch.Tensor) -> torch.Tensor:
        sizes.append(chunk.shape[0])
        return row_solver(chunk)

    row_bytes = 50 * 4
    got = map_row_chunks(recording, rhs, budget=8 * row_bytes)
    assert sizes == [8, 8, 8, 8, 5]
    assert torch.equal(got, whole)
    sizes.clear()
    assert torch.equal(
        map_row_chunks(recording, rhs, budget=3 * row_bytes, bytes_per_row=row_bytes * 3), whole
    )
    assert sizes == [1] * 37
    sizes.clear()
    assert torch.equal(map_row_chunks(recording, rhs, budget=10**9), whole) and sizes == [37]


def test_vmapped_cg_chunks_agree():
    """A conjugate-gradient solve vmapped over test vectors, as the IF solvers do."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(20, 20, generator=g, dtype=torch.float64)
    h = m @ m.T + 20 * torch.eye(20, dtype=torch.float64)

    def cg(b: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        for _ in range(30):
            hp = h @ p
            alpha = (r @ r) / (p @ hp)
            x = x + alpha * p
            r_new = r - alpha * hp
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
        return x

    rhs = torch.randn(11, 20, generator=g, dtype=torch.float64)
    solve = vmap(cg)
    chunked = map_row_chunks(solve, rhs, budget=4 * 20 * 8 * 3, bytes_per_row=4 * 20 * 8)
    torch.testing.assert_close(chunked, solve(rhs))
    torch.testing.assert_close(chunked, torch.linalg.solve(h, rhs.T).T)


def test_wrong_row_count_is_an_error():
    with pytest.raises(ValueError, match="returned 1 rows"):
        map_row_chunks(lambda c: c[:1], torch.zeros(6, 2), budget=2 * 2 * 4)
