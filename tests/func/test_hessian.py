"""Hessian primitives against softmax regression with L2, whose Hessian is analytic."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import cross_entropy

from dattri_cli.errors import NumericalError
from dattri_cli.func.hessian import (
    arnoldi,
    batched_cg,
    explicit_hessian,
    lissa,
    loader_hvp,
    minibatch_hvp_sampler,
    symmetric_inverse,
)

N, D, C, LAM = 30, 4, 3, 0.05
P = D * C + C


def loss(w: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Mean softmax cross-entropy of a linear model plus ``LAM/2 |w|^2``."""
    x, t = batch
    weight, bias = w[: D * C].view(C, D), w[D * C :]
    return cross_entropy(x @ weight.T + bias, t) + 0.5 * LAM * (w * w).sum()


@pytest.fixture(scope="module")
def problem() -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    t = torch.randint(0, C, (N,), generator=gen)
    w = 0.5 * torch.randn(P, generator=gen, dtype=torch.float64)
    return {
        "x": x,
        "t": t,
        "w": w,
        "hess": analytic_hessian(w, x),
        "v": torch.randn(5, P, generator=gen, dtype=torch.float64),
    }


def jacobian_of_logits(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, P)``: d logit_c / d w for the (row-major W, then b) layout."""
    jac = torch.zeros(x.shape[0], C, P, dtype=x.dtype)
    for c in range(C):
        jac[:, c, c * D : (c + 1) * D] = x
        jac[:, c, D * C + c] = 1.0
    return jac


def analytic_hessian(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean_i J_i^T (diag(p_i) - p_i p_i^T) J_i + LAM I`` written out by hand."""
    weight, bias = w[: D * C].view(C, D), w[D * C :]
    prob = torch.softmax(x @ weight.T + bias, dim=1)
    curv = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    jac = jacobian_of_logits(x)
    return torch.einsum("ncp,ncd,ndq->pq", jac, curv, jac) / x.shape[0] + LAM * torch.eye(P, dtype=x.dtype)


def batches(problem: dict, size: int) -> list:
    x, t = problem["x"], problem["t"]
    return [(x[i : i + size], t[i : i + size]) for i in range(0, N, size)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("size", [1, 7, N])
def test_explicit_hessian_is_batch_size_weighted_mean(problem: dict, size: int) -> None:
    hess = explicit_hessian(loss, problem["w"], batches(problem, size))
    assert rel_err(hess, problem["hess"]) < 1e-12


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_loader_hvp_matches_analytic_hessian(problem: dict, mode: str) -> None:
    hvp = loader_hvp(loss, problem["w"], batches(problem, 7), mode=mode, regularization=0.3)
    expected = problem["v"] @ (problem["hess"] + 0.3 * torch.eye(P, dtype=torch.float64))
    assert rel_err(hvp(problem["v"]), expected) < 1e-12


def test_rev_fwd_equals_rev_rev_in_float32(problem: dict) -> None:
    w = problem["w"].float()
    data = [(x.float(), t) for x, t in batches(problem, 11)]
    v = problem["v"].float()
    rev = loader_hvp(loss, w, data, mode="rev-rev")(v)
    fwd = loader_hvp(loss, w, data, mode="rev-fwd")(v)
    assert torch.allclose(rev, fwd, rtol=1e-5, atol=1e-6)


def test_unknown_mode_is_a_config_error(problem: dict) -> None:
    from dattri_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="rev-rev"):
        loader_hvp(loss, problem["w"], batches(problem, 7), mode="fwd-fwd")


def test_batched_cg_solves_every_right_hand_side(problem: dict) -> None:
    hvp = loader_hvp(loss, problem["w"], batches(problem, 7))
    result = batched_cg(hvp, problem["v"], max_iter=3 * P, tol=1e-10)
    expected = torch.linalg.solve(problem["hess"], problem["v"].T).T
    assert result.converged
    assert rel_err(result.solution, expected) < 1e-8
    assert result.residual_norms[-1] <= 1e-10 < result.residual_norms[0]
    diag = result.diagnostics(1e-10)
    assert diag["tol_reached"] and len(diag["residual_norms"]) == result.iterations + 1


def test_batched_cg_reports_not_reaching_tol(problem: dict) -> None:
    hvp = loader_hvp(loss, problem["w"], batches(problem, 7))
    result = batched_cg(hvp, problem["v"], max_iter=2, tol=1e-12)
    assert not result.converged and result.iterations == 2
    assert result.residual_norms[-1] < result.residual_norms[0]


def test_batched_cg_refuses_a_singular_hessian(problem: dict) -> None:
    def linear(w: torch.Tensor, batch: tuple) -> torch.Tensor:
        return (batch[0] @ w[:D]).mean()

    hvp = loader_hvp(linear, problem["w"], batches(problem, 7))
    with pytest.raises(NumericalError, match="regularization"):
        batched_cg(hvp, problem["v"], max_iter=5)


def test_lissa_full_batch_converges_to_damped_inverse(problem: dict) -> None:
    data = (problem["x"], problem["t"])
    sampler = minibatch_hvp_sampler(loss, problem["w"], data, batch_size=N)
    damping, scaling = 0.01, 2.0
    result = lissa(sampler, problem["v"], recursion_depth=600, damping=damping, scaling=scaling)
    shifted = problem["hess"] + damping * scaling * torch.eye(P, dtype=torch.float64)
    expected = torch.linalg.solve(shifted, problem["v"].T).T
    assert rel_err(result.solution, expected) < 1e-6
    assert result.diagnostics["effective_regularization"] == pytest.approx(0.02)


def test_lissa_minibatch_is_close_and_has_the_right_scale(problem: dict) -> None:
    torch.manual_seed(0)
    sampler = minibatch_hvp_sampler(loss, problem["w"], (problem["x"], problem["t"]), batch_size=10)
    result = lissa(sampler, problem["v"], recursion_depth=400, num_repeat=2, scaling=2.0)
    expected = torch.linalg.solve(problem["hess"], problem["v"].T).T
    assert rel_err(result.solution, expected) < 0.3


def test_lissa_divergence_is_detected(problem: dict) -> None:
    sampler = minibatch_hvp_sampler(loss, problem["w"], (problem["x"], problem["t"]), batch_size=N)
    with pytest.raises(NumericalError, match="scaling"):
        lissa(sampler, problem["v"], recursion_depth=500, scaling=0.01)


@pytest.mark.parametrize("batch_size", [1, 4, 10])
def test_sampler_blocks_sum_to_the_whole_set_sampler(problem: dict, batch_size: int) -> None:
    """Row blocks (as torchrun ranks hold them) weighted by their share add up to one process."""
    x, t, v = problem["x"], problem["t"], problem["v"]
    whole = minibatch_hvp_sampler(loss, problem["w"], (x, t), batch_size)
    bounds = [(0, 12), (12, 18), (18, N)]
    parts = [
        minibatch_hvp_sampler(loss, problem["w"], (x[a:b], t[a:b]), batch_size, offset=a, total=N)
        for a, b in bounds
    ]
    empty_parts = 0
    for seed in range(8):
        torch.manual_seed(seed)
        expected = whole(v)
        got = []
        for part in parts:  # every rank starts from the same generator state
            torch.manual_seed(seed)
            got.append(part(v))
        empty_parts += sum(int(not g.any()) for g in got)
        torch.testing.assert_close(sum(got), expected, rtol=1e-10, atol=1e-12)
    if batch_size == 1:  # two of the three blocks hold none of each minibatch and add zeros
        assert empty_parts == 2 * 8


def test_sampler_refuses_a_block_outside_the_set(problem: dict) -> None:
    with pytest.raises(ValueError, match="do not lie within"):
        minibatch_hvp_sampler(loss, problem["w"], (problem["x"], problem["t"]), 4, offset=5, total=N)


def test_arnoldi_with_full_dimension_is_the_exact_inverse(problem: dict) -> None:
    hvp = loader_hvp(loss, problem["w"], batches(problem, 7))
    eig = arnoldi(hvp, P, proj_dim=P, max_iter=P, round_off=1e-15)
    expected = torch.linalg.solve(problem["hess"], problem["v"].T).T
    assert eig.eigenvalues.numel() == P
    assert rel_err(eig.apply(problem["v"]), expected) < 1e-8
    projected = eig.project(problem["v"])
    assert rel_err(projected @ projected.T, problem["v"] @ expected.T) < 1e-8


def test_arnoldi_keeps_the_top_eigenvalues(problem: dict) -> None:
    hvp = loader_hvp(loss, problem["w"], batches(problem, 7))
    eig = arnoldi(hvp, P, proj_dim=3, max_iter=P)
    top = torch.linalg.eigvalsh(problem["hess"]).flip(0)[:3]
    assert torch.allclose(eig.eigenvalues, top, rtol=1e-8)


def test_arnoldi_drops_non_positive_eigenvalues_without_nan() -> None:
    diag = torch.tensor([3.0, 1.0, 0.0, 0.0, -2.0, 1e-12], dtype=torch.float64)
    eig = arnoldi(lambda v: v * diag, 6, proj_dim=6, max_iter=6)
    assert eig.diagnostics["kept_eigenvalues"] == 2
    assert eig.diagnostics["dropped_eigenvalues"] == 4
    out = eig.apply(torch.ones(2, 6, dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], torch.tensor([1 / 3, 1, 0, 0, 0, 0], dtype=torch.float64), atol=1e-8)


def test_arnoldi_with_nothing_positive_is_an_error() -> None:
    with pytest.raises(NumericalError, match="regularization"):
        arnoldi(lambda v: -v, 4, proj_dim=4, max_iter=4)


def test_symmetric_inverse_refuses_singular_without_regularization() -> None:
    with pytest.raises(NumericalError, match="regularization"):
        symmetric_inverse(torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), 0.0)
