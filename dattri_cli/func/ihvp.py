"""Inverse-Hessian-vector products: rows ``(H + reg I)^-1 v`` for a batch of vectors ``v``.

``H`` is the Hessian of the mean of ``func(params, batch)`` over the batches of
``loader``. Each solver is a small function of ``(func, params, loader, device, rhs,
**options)`` returning ``(solution, diagnostics)``: it transforms all rows of ``rhs``
(one checkpoint's test gradients) in one batched solve. The task-based influence
attributors and the function-style ``IFAttributor`` share them; :data:`SOLVERS` names
them with the options each accepts.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

from dattri_cli import distributed
from dattri_cli.func.batch import map_tensors
from dattri_cli.func.hessian import (
    ArnoldiEigen,
    arnoldi,
    batched_cg,
    check_mode,
    explicit_hessian,
    lissa,
    loader_hvp,
    minibatch_hvp_sampler,
    stack_loader,
    symmetric_inverse,
)

log = logging.getLogger("dattri_cli")
Func = Callable[[Tensor, Tuple[Tensor, ...]], Tensor]
Diagnostics = Dict[str, Any]


def ihvp_explicit(
    func: Func, params: Tensor, loader: Any, device: str, rhs: Tensor, regularization: float = 0.0
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``(H + reg I)^-1 v`` with a dense float64 Hessian (small models)."""
    inverse = symmetric_inverse(explicit_hessian(func, params, loader, device), regularization)
    return inverse.apply(rhs), dict(inverse.diagnostics)


def ihvp_cg(
    func: Func,
    params: Tensor,
    loader: Any,
    device: str,
    rhs: Tensor,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``(H + reg I)^-1 v`` by CG vectorised over all rows; logs the residual history."""
    hvp = loader_hvp(func, params, loader, device, mode, regularization)
    result = batched_cg(hvp, rhs, max_iter, tol)
    diagnostics = result.diagnostics(tol)
    level = logging.INFO if result.converged else logging.WARNING
    log.log(
        level,
        "CG: %d iterations, largest residual norm %.3g -> %.3g (tol %.3g %s)",
        result.iterations,
        result.residual_norms[0],
        result.residual_norms[-1],
        tol,
        "reached" if result.converged else "NOT reached: raise max_iter or regularization",
    )
    norms = ", ".join(f"{r:.3g}" for r in result.residual_norms)
    log.debug("CG residual norms per iteration: %s", norms)
    return result.solution, diagnostics


def lissa_collate(sampled_input: List[Tensor]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Split ``[params, *data_tensors]`` into ``(params, data_batch)``, dtypes unchanged."""
    return sampled_input[0], tuple(sampled_input[1:])


def ihvp_lissa(
    func: Func,
    params: Tensor,
    loader: Any,
    device: str,
    rhs: Tensor,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    mode: str = "rev-rev",
    collate_fn: Callable = lissa_collate,
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``(H + damping * scaling * I)^-1 v`` by LiSSA (dattri's convention).

    Afterwards one full-data Hessian-vector product measures how far the estimate
    is from solving that system (``relative_residual``); a poor value is logged
    as a warning rather than returned silently. Under torchrun (inside
    :func:`distributed.split_reductions`) ``loader`` holds this rank's rows; every
    rank gathers all rows (one process stacks them all too) and runs the
    single-process recursion on them, so the result is that of one process, bit for
    bit, whatever the number of ranks.
    """
    check_mode(mode)
    data = map_tensors(distributed.all_rows, stack_loader(loader, device))
    with distributed.local_reductions():  # every rank holds every row: nothing to sum over ranks
        sampler = minibatch_hvp_sampler(func, params, data, batch_size, mode, collate_fn)
        result = lissa(sampler, rhs, recursion_depth, num_repeat, damping, scaling)
        hvp = loader_hvp(func, params, [data], device, mode, damping * scaling)
        residual = float((hvp(result.solution) - rhs).norm() / rhs.norm().clamp_min(1e-30))
    diagnostics = dict(result.diagnostics, relative_residual=residual)
    if not residual < 0.5:
        log.warning(
            "LiSSA has not converged (relative residual %.3g): "
            "increase recursion_depth, damping or batch_size",
            residual,
        )
    return result.solution, diagnostics


def arnoldi_eigen(
    func: Func,
    params: Tensor,
    loader: Any,
    device: str,
    proj_dim: int = 100,
    max_iter: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    regularization: float = 0.0,
    seed: int = 0,
    mode: str = "rev-rev",
) -> ArnoldiEigen:
    """Top eigenpairs of ``H + reg I`` by float64 Arnoldi; logs how many were dropped."""
    hvp = loader_hvp(func, params, loader, device, mode, regularization)
    eig = arnoldi(
        hvp,
        params.numel(),
        proj_dim=proj_dim,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        norm_constant=norm_constant,
        round_off=torch.finfo(params.dtype).eps,
    )
    log.info(
        "Arnoldi: kept %d eigenvalues, dropped %d non-positive or round-off ones",
        eig.diagnostics["kept_eigenvalues"],
        eig.diagnostics["dropped_eigenvalues"],
    )
    return eig


def ihvp_arnoldi(
    func: Func, params: Tensor, loader: Any, device: str, rhs: Tensor, **kwargs: Any
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``U^T diag(1/lambda) U v`` from the top Arnoldi eigenpairs of ``H + reg I``."""
    eig = arnoldi_eigen(func, params, loader, device, **kwargs)
    return eig.apply(rhs), dict(eig.diagnostics)


#: solver name -> (function, the options it accepts besides func, params, loader, device, rhs)
SOLVERS: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {
    "explicit": (ihvp_explicit, ("regularization",)),
    "cg": (ihvp_cg, ("max_iter", "tol", "mode", "regularization")),
    "arnoldi": (
        ihvp_arnoldi,
        ("proj_dim", "max_iter", "norm_constant", "tol", "regularization", "seed", "mode"),
    ),
    "lissa": (ihvp_lissa, ("batch_size", "num_repeat", "recursion_depth", "damping", "scaling", "mode")),
}
