"""The iHVP solver wrappers against least squares, whose Hessian ``X^T X / n + LAM I`` is exact."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.errors import NumericalError
from dattri_cli.func.ihvp import (
    SOLVERS,
    arnoldi_eigen,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
    lissa_collate,
)

N, P, K, LAM = 24, 6, 3, 0.1


def loss(w: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Mean of ``(x.w - y)^2 / 2`` over the batch plus ``LAM/2 |w|^2``."""
    x, y = batch
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * LAM * (w * w).sum()


def _data() -> tuple:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, P, generator=gen, dtype=torch.float64)
    y = torch.randn(N, generator=gen, dtype=torch.float64)
    w = torch.randn(P, generator=gen, dtype=torch.float64)
    rhs = torch.randn(K, P, generator=gen, dtype=torch.float64)
    return x, y, w, rhs


X, Y, W, RHS = _data()
HESSIAN = X.T @ X / N + LAM * torch.eye(P, dtype=torch.float64)


def loader(batch_size: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=False)


def exact(reg: float = 0.0) -> torch.Tensor:
    return torch.linalg.solve(HESSIAN + reg * torch.eye(P, dtype=torch.float64), RHS.T).T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch_size", [1, 5, N])
def test_explicit_solves_the_regularized_system_whatever_the_batching(batch_size: int) -> None:
    solution, diagnostics = ihvp_explicit(loss, W, loader(batch_size), "cpu", RHS, regularization=0.2)
    assert rel_err(solution, exact(0.2)) < 1e-10
    assert diagnostics["positive_definite"]


def test_cg_with_enough_iterations_reaches_tol() -> None:
    solution, diagnostics = ihvp_cg(loss, W, loader(), "cpu", RHS, max_iter=3 * P, tol=1e-12)
    assert rel_err(solution, exact()) < 1e-8
    assert diagnostics["tol_reached"] and diagnostics["residual_norms"][-1] <= 1e-12


def test_cg_few_iterations_reports_tol_not_reached() -> None:
    _, diagnostics = ihvp_cg(loss, W, loader(), "cpu", RHS, max_iter=2)
    assert not diagnostics["tol_reached"]
    assert diagnostics["iterations"] == 2 and len(diagnostics["residual_norms"]) == 3


def test_cg_rev_fwd_equals_rev_rev() -> None:
    rev, _ = ihvp_cg(loss, W, loader(), "cpu", RHS, max_iter=4, mode="rev-rev")
    fwd, _ = ihvp_cg(loss, W, loader(), "cpu", RHS, max_iter=4, mode="rev-fwd")
    assert rel_err(fwd, rev) < 1e-10


def test_lissa_damping_times_scaling_is_the_regularization() -> None:
    # full batches make the recursion deterministic; scaling above the largest eigenvalue converges
    scaling = float(torch.linalg.eigvalsh(HESSIAN).max()) * 1.5
    solution, diagnostics = ihvp_lissa(
        loss,
        W,
        loader(),
        "cpu",
        RHS,
        batch_size=N,
        recursion_depth=400,
        damping=0.1 / scaling,
        scaling=scaling,
    )
    assert rel_err(solution, exact(0.1)) < 1e-6
    assert diagnostics["relative_residual"] < 1e-6


def test_lissa_divergence_names_scaling_and_damping() -> None:
    with pytest.raises(NumericalError, match="scaling.*damping"):
        ihvp_lissa(loss, W, loader(), "cpu", RHS, batch_size=N, recursion_depth=300, scaling=0.01)


def test_lissa_collate_splits_params_from_data_and_keeps_dtypes() -> None:
    params, x, y = torch.zeros(3), torch.ones(2, 4), torch.tensor([0, 1])
    out_params, batch = lissa_collate([params, x, y])
    assert out_params is params and len(batch) == 2 and batch[1].dtype == torch.int64


def test_arnoldi_full_dimension_matches_explicit() -> None:
    solution, diagnostics = ihvp_arnoldi(
        loss, W, loader(), "cpu", RHS, proj_dim=P, max_iter=P, regularization=0.2
    )
    assert rel_err(solution, exact(0.2)) < 1e-8
    assert diagnostics["kept_eigenvalues"] == P


def test_arnoldi_eigen_is_seeded() -> None:
    first = arnoldi_eigen(loss, W, loader(), "cpu", proj_dim=3, max_iter=4, seed=1)
    again = arnoldi_eigen(loss, W, loader(), "cpu", proj_dim=3, max_iter=4, seed=1)
    assert torch.equal(first.eigenvalues, again.eigenvalues) and torch.equal(
        first.eigenvectors, again.eigenvectors
    )


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_table_lists_exactly_each_solvers_options(name: str) -> None:
    function, options = SOLVERS[name]
    target = arnoldi_eigen if function is ihvp_arnoldi else function
    skip = {"func", "params", "loader", "device", "rhs", "collate_fn"}
    assert set(options) == set(inspect.signature(target).parameters) - skip


def test_cg_in_row_chunks_equals_one_batched_solve() -> None:
    rhs = torch.cat([RHS, 2.0 * RHS[:2] - RHS[1:]])  # 5 rows
    whole, diag_whole = ihvp_cg(loss, W, loader(), "cpu", rhs, max_iter=4)
    row_bytes = P * W.element_size() * 8  # CG_VECTORS_PER_ROW parameter-sized vectors
    chunked, diag = ihvp_cg(loss, W, loader(), "cpu", rhs, max_iter=4, chunk_bytes=2 * row_bytes)
    assert diag["row_chunks"] == 3 and "row_chunks" not in diag_whole
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    assert rel_err(whole[:K], exact()) > 1e-6  # 4 iterations: not converged, so rows really iterate apart
    assert diag["residual_norms"][0] == diag_whole["residual_norms"][0]


def test_lissa_in_row_chunks_sees_the_same_minibatches() -> None:
    rhs = torch.cat([RHS, -RHS])
    opts = dict(batch_size=3, recursion_depth=40, scaling=10.0)  # noqa: C408
    torch.manual_seed(0)
    whole, _ = ihvp_lissa(loss, W, loader(), "cpu", rhs, **opts)
    after_whole = torch.rand(3)
    torch.manual_seed(0)
    chunked, diag = ihvp_lissa(
        loss, W, loader(), "cpu", rhs, chunk_bytes=P * W.element_size() * 8 * 4, **opts
    )
    assert diag["row_chunks"] == 2
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.rand(3), after_whole)  # the random state is left as one pass leaves it


def test_lissa_samples_dict_batches() -> None:
    def dict_loss(w: torch.Tensor, batch: dict) -> torch.Tensor:
        return loss(w, (batch["x"], batch["labels"]))

    rows = [{"x": X[i : i + 5], "labels": Y[i : i + 5]} for i in range(0, N, 5)]
    opts = dict(batch_size=4, recursion_depth=30, scaling=10.0)  # noqa: C408
    torch.manual_seed(1)
    from_dicts, _ = ihvp_lissa(dict_loss, W, rows, "cpu", RHS, **opts)
    torch.manual_seed(1)
    tuples = [(b["x"], b["labels"]) for b in rows]  # a DataLoader would draw a seed from the random state
    from_tuples, _ = ihvp_lissa(loss, W, tuples, "cpu", RHS, **opts)
    torch.testing.assert_close(from_dicts, from_tuples)
