"""Inverse-Hessian-vector products: rows ``(H + reg I)^-1 v`` for a batch of vectors ``v``.

``H`` is the Hessian of the mean of ``func(params, batch)`` over the batches of
``loader``. Each solver is a small function of ``(func, params, loader, device, rhs,
**options)`` returning ``(solution, diagnostics)``: it transforms all rows of ``rhs``
(one checkpoint's test gradients) in one batched solve. The task-based influence
attributors and the function-style ``IFAttributor`` share them; :data:`SOLVERS` names
them with the options each accepts.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from dattri_cli import distributed
from dattri_cli.func.batch import map_tensors
from dattri_cli.func.chunking import rows_per_chunk
from dattri_cli.func.hessian import (
    ArnoldiEigen,
    CGResult,
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

#: default working-memory budget of one chunk of right-hand sides (CG, LiSSA): fixed, not read
#: from the machine, so the chunking (and the bits) never depend on where a run happens
CHUNK_BUDGET_BYTES = 2 * 2**30
#: working vectors of P values held per right-hand side while its HVPs run (the solver's own
#: vectors plus the vmapped HVP's input, output and parameter-sized intermediates)
CG_VECTORS_PER_ROW = 8
LISSA_VECTORS_PER_ROW = 8


def solver_row_bytes(num_params: int, element_size: int, vectors: int = CG_VECTORS_PER_ROW) -> int:
    """Working bytes per right-hand side of an iterative solver over ``num_params`` parameters."""
    return max(1, int(num_params) * int(element_size) * int(vectors))


def chunk_rows(num_params: int, element_size: int, budget: Optional[int], vectors: int) -> int:
    """Right-hand sides solved together under ``budget`` bytes (None: :data:`CHUNK_BUDGET_BYTES`)."""
    budget = CHUNK_BUDGET_BYTES if budget is None else int(budget)
    return rows_per_chunk(solver_row_bytes(num_params, element_size, vectors), budget)


def _row_chunks(rows: int, step: int) -> Iterator[slice]:
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


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
    chunk_bytes: Optional[int] = None,
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``(H + reg I)^-1 v`` by CG vectorised over rows; logs the residual history.

    The rows are solved in chunks whose working memory (about
    :data:`CG_VECTORS_PER_ROW` parameter-sized vectors per row) stays under
    ``chunk_bytes`` (default :data:`CHUNK_BUDGET_BYTES`); every row's iteration is its
    own, so chunking does not change the solution.
    """
    hvp = loader_hvp(func, params, loader, device, mode, regularization)
    step = chunk_rows(params.numel(), params.element_size(), chunk_bytes, CG_VECTORS_PER_ROW)
    if step >= rhs.shape[0]:
        result = batched_cg(hvp, rhs, max_iter, tol)
    else:
        parts = [batched_cg(hvp, rhs[rows], max_iter, tol) for rows in _row_chunks(rhs.shape[0], step)]
        norms = [
            max(r.residual_norms[i] if i < len(r.residual_norms) else r.residual_norms[-1] for r in parts)
            for i in range(max(len(r.residual_norms) for r in parts))
        ]
        result = CGResult(
            torch.cat([r.solution for r in parts]),
            norms,
            all(r.converged for r in parts),
            max(r.iterations for r in parts),
        )
    diagnostics = result.diagnostics(tol)
    if step < rhs.shape[0]:
        diagnostics["row_chunks"] = -(-rhs.shape[0] // step)
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
    chunk_bytes: Optional[int] = None,
) -> Tuple[Tensor, Diagnostics]:
    """Rows ``(H + damping * scaling * I)^-1 v`` by LiSSA (dattri's convention).

    Rows are carried in chunks under ``chunk_bytes`` (default
    :data:`CHUNK_BUDGET_BYTES`); every chunk replays the same minibatch draws (the
    random state is rewound per chunk and left as one pass leaves it), so chunking
    does not change which Hessians a row sees.

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
    step = chunk_rows(params.numel(), params.element_size(), chunk_bytes, LISSA_VECTORS_PER_ROW)
    with distributed.local_reductions():  # every rank holds every row: nothing to sum over ranks
        sampler = minibatch_hvp_sampler(func, params, data, batch_size, mode, collate_fn)
        if step >= rhs.shape[0]:
            result = lissa(sampler, rhs, recursion_depth, num_repeat, damping, scaling)
            solution, stats = result.solution, result.diagnostics
        else:
            parts = []
            with _replayed_random_state() as rewind:
                for rows in _row_chunks(rhs.shape[0], step):
                    rewind()
                    parts.append(lissa(sampler, rhs[rows], recursion_depth, num_repeat, damping, scaling))
            solution = torch.cat([r.solution for r in parts])
            stats = dict(parts[0].diagnostics, row_chunks=len(parts))
            stats["max_norm_ratio"] = max(r.diagnostics["max_norm_ratio"] for r in parts)
        hvp = loader_hvp(func, params, [data], device, mode, damping * scaling)
        applied = torch.cat([hvp(solution[rows]) for rows in _row_chunks(rhs.shape[0], step)])
        residual = float((applied - rhs).norm() / rhs.norm().clamp_min(1e-30))
    diagnostics = dict(stats, relative_residual=residual)
    if not residual < 0.5:
        log.warning(
            "LiSSA has not converged (relative residual %.3g): "
            "increase recursion_depth, damping or batch_size",
            residual,
        )
    return solution, diagnostics


@contextlib.contextmanager
def _replayed_random_state() -> Iterator[Callable[[], None]]:
    """``rewind()`` resets torch's CPU random state to its value on entry; on exit the state is the
    one the last replay left (what a single pass leaves)."""
    start = torch.get_rng_state()

    def rewind() -> None:
        torch.set_rng_state(start)

    yield rewind


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
    "cg": (ihvp_cg, ("max_iter", "tol", "mode", "regularization", "chunk_bytes")),
    "arnoldi": (
        ihvp_arnoldi,
        ("proj_dim", "max_iter", "norm_constant", "tol", "regularization", "seed", "mode"),
    ),
    "lissa": (
        ihvp_lissa,
        ("batch_size", "num_repeat", "recursion_depth", "damping", "scaling", "mode", "chunk_bytes"),
    ),
}
