"""DataInf against its definition: the average of dense per-sample damped inverses."""

from __future__ import annotations

import pytest
import torch

from dattri_cli.errors import ConfigError
from dattri_cli.func.fisher import DataInfAccumulator, datainf_ifvp, layer_sizes_from_map


def naive_datainf(grads: torch.Tensor, tests: torch.Tensor, sizes: list, reg: float) -> torch.Tensor:
    """``1/n sum_i (g_i g_i^T + reg I)^-1 v`` per layer, with explicit matrix inverses."""
    out, start = [], 0
    for size in sizes:
        g = grads[:, start : start + size]
        inverse = sum(
            torch.linalg.inv(torch.outer(gi, gi) + reg * torch.eye(size, dtype=g.dtype)) for gi in g
        )
        out.append(tests[:, start : start + size] @ (inverse / g.shape[0]))
        start += size
    return torch.cat(out, dim=1)


@pytest.fixture
def data() -> tuple:
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    tests = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    return grads, tests


@pytest.mark.parametrize("reg", [0.01, 0.5, 3.0])
def test_datainf_equals_naive_formula(data: tuple, reg: float) -> None:
    grads, tests = data
    sizes = [3, 4]
    out = datainf_ifvp(grads, tests, sizes, reg)
    assert torch.allclose(out, naive_datainf(grads, tests, sizes, reg), rtol=1e-9, atol=1e-9)


def test_layers_are_independent_blocks(data: tuple) -> None:
    grads, tests = data
    split = datainf_ifvp(grads, tests, [3, 4], 0.2)
    whole = datainf_ifvp(grads, tests, [7], 0.2)
    assert not torch.allclose(split, whole)
    assert torch.allclose(split[:, :3], datainf_ifvp(grads[:, :3], tests[:, :3], [3], 0.2))


def test_chunking_does_not_change_the_result(data: tuple) -> None:
    grads, tests = data
    one = datainf_ifvp(grads, tests, [2, 5], 0.1, chunk_size=100)
    many = datainf_ifvp(grads, tests, [2, 5], 0.1, chunk_size=2)
    assert torch.allclose(one, many, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", [0.0, -1.0])
def test_non_positive_regularization_is_refused(data: tuple, reg: float) -> None:
    with pytest.raises(ConfigError, match="regularization"):
        DataInfAccumulator(data[1], [7], reg)


def test_layer_sizes_from_map() -> None:
    assert layer_sizes_from_map([6, 2, 4, 1], [0, 0, 1, 1]) == [8, 5]
