"""Hessians of the mean training loss and solves against them.

Everything here knows only a function ``f(flat_params, batch) -> mean loss`` and
a loader; nothing about attributors. The Hessian of the mean loss over the whole
training set is accumulated batch by batch with weights ``batch_size / N``, so the
answer does not depend on how the loader is batched (when ``f`` is a batch mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from dattri_cli import distributed
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.func.batch import batch_size_of, concat_batches, index_batch, tensor_leaves, to_device
from dattri_cli.func.utils import check_finite
from dattri_cli.progress import track


def explicit_hessian(
    func: Callable[[Tensor, Tuple[Tensor, ...]], Tensor],
    params: Tensor,
    loader: Iterable,
    device: str = "cpu",
) -> Tensor:
    """Dense Hessian (float64) of the mean of ``func`` over all samples of ``loader``."""
    # under torchrun each rank holds part of the training set: the per-batch parts are
    # summed in global batch order, the bits of one process
    total = distributed.OrderedSum()
    count = 0
    hess_func = jacrev(jacrev(func))  # reverse-over-reverse: fastest for small dense Hessians on CPU
    for batch in track(loader, "Hessian"):
        data = to_device(batch, device)
        n = batch_size_of(data)
        total.add(hess_func(params, data).detach().to(torch.float64) * n)
        count += n
    if count == 0:
        msg = "the training loader is empty: cannot form the Hessian"
        raise NumericalError(msg)
    return total.result() / distributed.reduce_count(count)


@dataclass
class SymmetricInverse:
    """A factorization of ``H + reg I`` that applies its inverse, with diagnostics.

    Positive definite matrices use Cholesky; indefinite ones (non-convex models)
    fall back to LU with partial pivoting, like a plain inverse would.
    """

    factor: Tensor
    pivots: Optional[Tensor] = None
    diagnostics: Dict[str, float] = field(default_factory=dict)

    def apply(self, rhs: Tensor) -> Tensor:
        """``(H + reg I)^-1 g`` for every row ``g`` of ``rhs`` (shape ``(k, P)``)."""
        b = rhs.to(self.factor.dtype).T
        if self.pivots is None:
            x = torch.cholesky_solve(b, self.factor)
        else:
            x = torch.linalg.lu_solve(self.factor, self.pivots, b)
        return x.T.to(rhs.dtype)


def _singular(what: str, regularization: float, smallest: float, largest: float) -> NumericalError:
    msg = (
        f"the {what} plus regularization={regularization:g} is singular or nearly so "
        f"(pivots from {smallest:.3g} to {largest:.3g}); "
        "set `regularization` to a positive value, e.g. regularization=0.01"
    )
    return NumericalError(msg)


def symmetric_inverse(matrix: Tensor, regularization: float, what: str = "Hessian") -> SymmetricInverse:
    """Factor ``matrix + regularization * I`` (symmetric), refusing singular cases.

    A pivot below round-off relative to the largest one means the matrix is
    singular for our purpose: its inverse would be noise, so we stop and name the fix.
    """
    sym = (matrix + matrix.T) / 2
    sym = sym + regularization * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    if not bool(torch.isfinite(sym).all()):
        msg = f"non-finite values (NaN/Inf) in the {what}; check the data and checkpoint, or increase `regularization`"
        raise NumericalError(msg)
    eps = sym.shape[0] * torch.finfo(torch.float32).eps
    chol, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0:
        pivots = chol.diagonal() ** 2
        smallest, largest = float(pivots.min()), float(pivots.max())
        if largest == 0.0 or smallest <= eps * largest:
            raise _singular(what, regularization, smallest, largest)
        return SymmetricInverse(
            chol, None, {"positive_definite": True, "min_pivot": smallest, "max_pivot": largest}
        )
    lu, piv, info = torch.linalg.lu_factor_ex(sym)
    pivots = lu.diagonal().abs()
    smallest, largest = float(pivots.min()), float(pivots.max())
    if int(info) != 0 or largest == 0.0 or smallest <= eps * largest:
        raise _singular(what, regularization, smallest, largest)
    return SymmetricInverse(
        lu, piv, {"positive_definite": False, "min_pivot": smallest, "max_pivot": largest}
    )


# -- Hessian-vector products ----------------------------------------------------------

HVP_MODES = ("rev-rev", "rev-fwd")
Func = Callable[[Tensor, Tuple[Tensor, ...]], Tensor]


def check_mode(mode: str) -> None:
    """Refuse an unknown auto-diff mode with the list of valid ones."""
    if mode not in HVP_MODES:
        msg = f"mode must be one of {', '.join(HVP_MODES)}, got {mode!r}"
        raise ConfigError(msg)


def batch_hvp(
    func: Func, params: Tensor, batch: Tuple[Tensor, ...], mode: str = "rev-rev"
) -> Callable[[Tensor], Tensor]:
    """``V -> V @ H_batch`` for the Hessian of ``func(params, batch)``; ``V`` is ``(k, P)``.

    All ``k`` vectors share one linearisation: "rev-rev" differentiates the
    gradient in reverse mode (one forward/backward, then one vector-Jacobian product
    per row, vectorised); "rev-fwd" pushes the rows forward through the gradient
    (forward-over-reverse), which stores less.
    """
    check_mode(mode)

    def grad_at(p: Tensor) -> Tensor:
        return grad(func)(p, batch)

    if mode == "rev-rev":
        _, vjp_fn = vjp(grad_at, params)
        return lambda vectors: vmap(lambda v: vjp_fn(v)[0])(vectors)
    return lambda vectors: vmap(lambda v: jvp(grad_at, (params,), (v,))[1])(vectors)


def loader_hvp(
    func: Func,
    params: Tensor,
    loader: Iterable,
    device: str = "cpu",
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """``V -> V @ (H + reg I)`` with ``H`` the Hessian of the mean loss over ``loader``.

    Batches are weighted by their size, so the answer does not depend on batching.
    Rows of ``V`` are cast to the parameter dtype for autograd and the result is
    returned in ``V``'s dtype.
    """
    check_mode(mode)

    def apply(vectors: Tensor) -> Tensor:
        work = vectors.to(params.dtype)
        # under torchrun each rank holds part of the training set: the per-batch parts
        # are summed in global batch order, the bits of one process
        acc = distributed.OrderedSum(torch.zeros_like(work))
        count = 0
        for batch in loader:
            data = to_device(batch, device)
            n = batch_size_of(data)
            acc.add(batch_hvp(func, params, data, mode)(work).detach() * n)
            count += n
        total = acc.result()
        count = distributed.reduce_count(count, str(total.device))
        if count == 0:
            msg = "the training loader is empty: cannot form Hessian-vector products"
            raise NumericalError(msg)
        return (total / count).to(vectors.dtype) + regularization * vectors

    return apply


# -- conjugate gradient, all right-hand sides at once ----------------------------------


@dataclass
class CGResult:
    """Solution rows and the history of the largest residual norm over rows."""

    solution: Tensor
    residual_norms: List[float]
    converged: bool
    iterations: int

    def diagnostics(self, tol: float) -> Dict[str, object]:
        """A plain dictionary for logs and output metadata."""
        return {
            "iterations": self.iterations,
            "tol": tol,
            "tol_reached": self.converged,
            "residual_norms": list(self.residual_norms),
            "final_residual_norm": self.residual_norms[-1],
        }


def batched_cg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    max_iter: int = 10,
    tol: float = 1e-7,
) -> CGResult:
    """Solve ``A x = b`` for every row ``b`` of ``rhs`` (``A`` symmetric positive definite).

    Plain CG vectorised over rows: each row keeps its own step sizes and stops
    once its residual norm is below ``tol``; ``matvec`` is only applied to the
    rows still running. A search direction with non-positive curvature (up to
    round-off) means ``A`` is not positive definite, which is reported as an error
    naming ``regularization`` rather than returning a meaningless solution.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    history = [float(rs.sqrt().max())] if rhs.numel() else [0.0]
    active = rs.sqrt() > tol
    eps = torch.finfo(rhs.dtype).eps * rhs.shape[1]
    max_curvature = 0.0
    iterations = 0
    for _ in track(range(max_iter), "conjugate gradient"):
        if not bool(active.any()):
            break
        iterations += 1
        idx = active.nonzero().squeeze(1)
        p_act = p[idx]
        ap = matvec(p_act)
        check_finite(ap, "conjugate gradient (Hessian-vector products)", hint="increase `regularization`")
        p_ap = (p_act * ap).sum(dim=1)
        curvature = p_ap / (p_act * p_act).sum(dim=1)
        max_curvature = max(max_curvature, float(curvature.max()))
        if bool((curvature <= eps * max_curvature).any()):
            msg = (
                "the Hessian plus regularization is singular or indefinite along a CG direction; "
                "set `regularization` to a positive value, e.g. regularization=0.01"
            )
            raise NumericalError(msg)
        alpha = rs[idx] / p_ap
        x[idx] += alpha[:, None] * p_act
        r[idx] -= alpha[:, None] * ap
        rs_new = (r[idx] * r[idx]).sum(dim=1)
        p[idx] = r[idx] + (rs_new / rs[idx])[:, None] * p_act
        rs[idx] = rs_new
        active = rs.sqrt() > tol
        history.append(float(rs.sqrt().max()))
    return CGResult(x, history, not bool(active.any()), iterations)


# -- LiSSA ---------------------------------------------------------------------------


@dataclass
class LissaResult:
    """The LiSSA estimate of ``(H + damping * scaling * I)^-1 V`` and diagnostics."""

    solution: Tensor
    diagnostics: Dict[str, object]


def lissa(
    sample_hvp: Callable[[Tensor], Tensor],
    rhs: Tensor,
    recursion_depth: int = 5000,
    num_repeat: int = 1,
    damping: float = 0.0,
    scaling: float = 50.0,
    growth_limit: float = 10.0,
) -> LissaResult:
    """LiSSA with all right-hand sides carried in one recursion.

    ``x <- v + (1 - damping) x - H_b x / scaling`` with a fresh minibatch Hessian
    ``H_b`` per step (``sample_hvp`` draws it), and ``x / scaling`` as the estimate,
    averaged over ``num_repeat`` runs. Its fixed point is
    ``(H + damping * scaling * I)^-1 v``, the convention of the public dattri
    library. When every step is a contraction, ``|x_t| <= (t + 1) |v|``; growth past
    ``growth_limit`` times that bound is exponential divergence and stops the run
    with an error suggesting larger ``scaling`` or ``damping``.
    """
    if scaling <= 0:
        msg = f"LiSSA `scaling` must be positive, got {scaling}"
        raise ConfigError(msg)
    rhs_norm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    total = torch.zeros_like(rhs)
    max_ratio = 0.0
    for repeat in range(num_repeat):
        x = rhs.clone()
        for step in track(range(recursion_depth), f"LiSSA recursion {repeat + 1}/{num_repeat}"):
            x = rhs + (1.0 - damping) * x - sample_hvp(x) / scaling
            ratio = float((x.norm(dim=1) / rhs_norm).max())
            if not math.isfinite(ratio) or ratio > growth_limit * (step + 2):
                msg = (
                    f"LiSSA diverged at step {step + 1} (|x|/|v| = {ratio:.3g}); "
                    f"increase `scaling` (now {scaling:g}) above the largest Hessian eigenvalue, "
                    f"or increase `damping` (now {damping:g})"
                )
                raise NumericalError(msg)
            max_ratio = max(max_ratio, ratio)
        total += x / scaling
    diagnostics = {
        "recursion_depth": recursion_depth,
        "num_repeat": num_repeat,
        "max_norm_ratio": max_ratio,
        "effective_regularization": damping * scaling,
    }
    return LissaResult(total / num_repeat, diagnostics)


# -- Arnoldi -------------------------------------------------------------------------


@dataclass
class ArnoldiEigen:
    """Top eigenpairs of ``H + reg I`` from a Krylov subspace, in float64.

    ``eigenvectors`` are rows; ``project`` maps gradients ``g`` to
    ``U g / sqrt(lambda) / norm_constant``, so inner products of projected train
    and test gradients approximate ``g_train^T H^-1 g_test``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    norm_constant: float = 1.0
    diagnostics: Dict[str, object] = field(default_factory=dict)

    def project(self, rows: Tensor) -> Tensor:
        """``(k, P) -> (k, num_eigenpairs)`` scaled by inverse square-root eigenvalues."""
        coeff = rows.to(torch.float64) @ self.eigenvectors.T
        return (coeff / (self.eigenvalues.sqrt() * self.norm_constant)).to(rows.dtype)

    def apply(self, rows: Tensor) -> Tensor:
        """The rank-limited inverse ``U^T diag(1/lambda) U`` applied to rows."""
        coeff = (rows.to(torch.float64) @ self.eigenvectors.T) / self.eigenvalues
        return (coeff @ self.eigenvectors / self.norm_constant**2).to(rows.dtype)


def arnoldi(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    proj_dim: int = 100,
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    norm_constant: float = 1.0,
    round_off: float = torch.finfo(torch.float32).eps,
) -> ArnoldiEigen:
    """Top ``proj_dim`` eigenpairs of the symmetric operator ``matvec`` by Arnoldi/Lanczos.

    The Krylov basis is kept in float64 and re-orthogonalised twice against all
    previous vectors (classical Gram-Schmidt, two passes), so it stays orthogonal
    to round-off. When the new direction's norm is below ``tol`` the basis spans an
    invariant subspace (this happens with repeated eigenvalues, e.g. from an L2
    term); the iteration then continues from a fresh random direction orthogonal
    to the basis, so ``max_iter >= dim`` always recovers the whole spectrum. Ritz values that are not positive and well
    above round-off (``round_off * sqrt(dim)`` times the largest one, ``round_off``
    being the precision of ``matvec``) are dropped and counted, so inverting the
    kept ones can never produce NaN/Inf.
    """
    steps = min(max_iter, dim)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(steps + 1, dim, dtype=torch.float64)
    hess = torch.zeros(steps + 1, steps, dtype=torch.float64)
    start = torch.rand(dim, generator=generator, dtype=torch.float64)
    basis[0] = start / start.norm()
    size = steps
    for n in track(range(steps), "Arnoldi iteration"):
        w = matvec(basis[n : n + 1]).to(torch.float64)[0]
        check_finite(w, "Arnoldi iteration (Hessian-vector products)", hint="increase `regularization`")
        for _ in range(2):
            coeff = basis[: n + 1] @ w
            w = w - coeff @ basis[: n + 1]
            hess[: n + 1, n] += coeff
        norm = float(w.norm())
        if norm < tol:
            # invariant subspace (e.g. a repeated eigenvalue): restart orthogonally
            w = _fresh_direction(basis[: n + 1], generator)
            if w is None:
                size = n + 1
                break
            norm = 0.0
        else:
            w = w / norm
        hess[n + 1, n] = norm
        basis[n + 1] = w
    return _ritz_pairs(hess[:size, :size], basis[:size], proj_dim, norm_constant, round_off)


def _fresh_direction(basis: Tensor, generator: torch.Generator) -> Tensor | None:
    """A random unit vector orthogonal to ``basis`` (None once the basis spans everything)."""
    if basis.shape[0] >= basis.shape[1]:
        return None
    w = torch.rand(basis.shape[1], generator=generator, dtype=torch.float64) - 0.5
    for _ in range(2):
        w = w - (basis @ w) @ basis
    norm = float(w.norm())
    return w / norm if norm > 0 else None


def _ritz_pairs(
    hess: Tensor, basis: Tensor, proj_dim: int, norm_constant: float, round_off: float
) -> ArnoldiEigen:
    """Keep the largest ``proj_dim`` safely positive Ritz pairs of the projected matrix."""
    sym = (hess + hess.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    largest = float(values.abs().max()) if values.numel() else 0.0
    threshold = largest * round_off * math.sqrt(basis.shape[1])
    safe = values > threshold
    order = torch.argsort(values[safe], descending=True)[:proj_dim]
    kept_values = values[safe][order]
    kept_vectors = (vectors[:, safe][:, order]).T @ basis
    diagnostics = {
        "krylov_dim": int(basis.shape[0]),
        "kept_eigenvalues": int(kept_values.numel()),
        "dropped_eigenvalues": int((~safe).sum()),
        "max_eigenvalue": largest,
        "min_kept_eigenvalue": float(kept_values.min()) if kept_values.numel() else float("nan"),
        "round_off_threshold": threshold,
    }
    if kept_values.numel() == 0:
        msg = (
            "Arnoldi found no eigenvalue of the Hessian plus regularization safely above zero; "
            "set `regularization` to a positive value, e.g. regularization=0.01"
        )
        raise NumericalError(msg)
    return ArnoldiEigen(kept_values, kept_vectors, norm_constant, diagnostics)


def stack_loader(loader: Iterable, device: str = "cpu") -> Any:
    """Concatenate the batches of a loader into one batch (tuple, dict or tensor, as yielded)."""
    parts: List[Any] = [to_device(batch, device) for batch in loader]
    if not parts:
        msg = "the training loader is empty"
        raise NumericalError(msg)
    return concat_batches(parts)


def minibatch_hvp_sampler(
    func: Func,
    params: Tensor,
    data: Tuple[Tensor, ...],
    batch_size: int,
    mode: str = "rev-rev",
    collate_fn: Callable | None = None,
    offset: int = 0,
    total: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """``V -> V @ H_b`` on a fresh random minibatch (no replacement) per call.

    ``collate_fn([params, *sampled_tensors]) -> (params, batch)`` may reshape the
    sample before use (LiSSA's ``lissa_collate_fn``); without it the sampled tensors
    are the batch. Dict (and bare-tensor) batches are passed on as sampled: dattri's
    collate convention only knows tuples of tensors. Uses the global torch random generator.

    ``data`` may be one block of a larger training set: global rows
    ``[offset, offset + len(data))`` of ``total`` (default: all of it). Every holder
    of a block then draws the same global minibatch (the same generator calls as one
    process holding everything), takes the batch-mean HVP of the sampled rows it
    holds weighted by their share of the minibatch (zero when it holds none), and the
    parts are summed by :func:`distributed.reduce_sum`, so the sum is the minibatch
    mean. With the whole set in ``data`` this is the single-process sampler, bit for bit.
    """
    num = batch_size_of(data)
    total = num if total is None else int(total)
    if offset < 0 or offset + num > total:
        msg = f"rows [{offset}, {offset + num}) do not lie within the {total} training rows"
        raise ValueError(msg)
    size = min(max(int(batch_size), 1), total)

    def sample(vectors: Tensor) -> Tensor:
        idx = torch.randperm(total)[:size]
        local = _owned_rows(idx, offset, num).to(tensor_leaves(data)[0].device)
        work = vectors.to(params.dtype)
        part = _weighted_hvp(func, params, data, local, size, mode, collate_fn, work)
        return distributed.reduce_sum(part).to(vectors.dtype)

    return sample


def _owned_rows(idx: Tensor, offset: int, num: int) -> Tensor:
    """The global rows ``idx`` that lie in ``[offset, offset + num)``, as local rows, in draw order."""
    owned = (idx >= offset) & (idx < offset + num)
    return idx[owned] - offset


def _weighted_hvp(
    func: Func,
    params: Tensor,
    data: Tuple[Tensor, ...],
    rows: Tensor,
    size: int,
    mode: str,
    collate_fn: Callable | None,
    work: Tensor,
) -> Tensor:
    """``work @ H`` of the batch mean over ``rows`` of ``data``, times ``len(rows) / size``.

    Holding all ``size`` sampled rows gives the plain minibatch product (no rescaling,
    so one process computes exactly what it always did); holding none gives zeros.
    """
    held = rows.numel()
    if held == 0:
        return torch.zeros_like(work)
    picked = index_batch(data, rows)
    if collate_fn is not None and isinstance(picked, (tuple, list)):  # dattri's collate: [params, *tensors]
        params, picked = collate_fn([params, *picked])
        picked = tuple(picked)
    product = batch_hvp(func, params, picked, mode)(work).detach()
    return product if held == size else product * (held / size)
