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


@pytest.mark.parametrize("rank", [12, 7])
def test_pseudo_inverse_from_the_gram_matrix_equals_the_kernels(rank: int) -> None:
    """12 rows of 50 dimensions (rank 12, or 7 with repeated rows): the n x n Gram route gives the
    pseudo-inverse of Phi^T Phi, as torch.linalg.pinv does, and the same warning."""
    phi = _phi(12, 50)
    if rank < 12:
        phi[rank:] = phi[: 12 - rank] * 2.0  # repeated directions: a rank-deficient Gram matrix
    rhs = _phi(50, 4) + 1.0
    expected = torch.linalg.pinv(phi.T @ phi, hermitian=True) @ rhs
    with pytest.warns(RuntimeWarning, match="12 training samples for 50"):
        solver = factor_kernel(phi.T @ phi, 12, rows=lambda: phi.float())
    assert solver.factor is None and solver.basis.shape == (50, rank)
    torch.testing.assert_close(solver.solve(rhs), expected, rtol=1e-4, atol=1e-6)
    # the eigendecomposition of the 50 x 50 kernel: the same operator
    with pytest.warns(RuntimeWarning):
        direct = factor_kernel(phi.T @ phi, 12)
    torch.testing.assert_close(solver.solve(rhs), direct.solve(rhs), rtol=1e-4, atol=1e-6)
    # a kernel that Cholesky factors never reads the rows
    solver = factor_kernel(phi.T @ phi, 12, regularization=0.1, rows=lambda: pytest.fail("rows read"))
    assert solver.factor is not None
