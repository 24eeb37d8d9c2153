"""The TRAK kernel factorisation: Cholesky when positive definite, else the pseudo-inverse."""

from __future__ import annotations

import pytest
import torch

from dattri_cli.errors import NumericalError
from dattri_cli.func.kernel import factor_kernel


def _phi(rows: int, dim: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_positive_definite_kernel_is_solved_by_cholesky() -> None:
    phi = _phi(40, 6)
    rhs = _phi(6, 3)
    solver = factor_kernel(phi.T @ phi, 40, regularization=0.5)
    assert solver.factor is not None and solver.min_pivot_relative > 0
    expected = torch.linalg.solve(phi.T @ phi + 0.5 * torch.eye(6, dtype=torch.float64), rhs)
    torch.testing.assert_close(solver.solve(rhs), expected, rtol=1e-6, atol=1e-9)


def test_singular_kernel_uses_the_pseudo_inverse_and_names_the_arguments() -> None:
    phi = _phi(3, 8)  # 3 rows span 3 of 8 directions
    with pytest.warns(
        RuntimeWarning, match=r'3 training samples for 8 .*e\.g\. regularization=.*"proj_dim"\]=2\)'
    ):
        solver = factor_kernel(phi.T @ phi, 3)
    assert solver.factor is None and solver.basis.shape == (8, 3)
    rhs = phi.T @ _phi(3, 2)  # in the span: the pseudo-inverse solves it exactly
    torch.testing.assert_close(phi.T @ phi @ solver.solve(rhs), rhs, rtol=1e-6, atol=1e-9)


def test_zero_kernel_is_refused() -> None:
    with pytest.raises(NumericalError, match="vanish"):
        factor_kernel(torch.zeros(4, 4, dtype=torch.float64), 10)
