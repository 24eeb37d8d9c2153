"""Hessians of the mean training loss and solves against them.

Everything here knows only a function ``f(flat_params, batch) -> mean loss`` and
a loader; nothing about attributors. The Hessian of the mean loss over the whole
training set is accumulated batch by batch with weights ``batch_size / N``, so the
answer does not depend on how the loader is batched (when ``f`` is a batch mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor
from torch.func import jacrev

from dattri_cli.algorithm.utils import batch_size_of, to_device
from dattri_cli.errors import NumericalError
from dattri_cli.progress import track


def explicit_hessian(
    func: Callable[[Tensor, Tuple[Tensor, ...]], Tensor],
    params: Tensor,
    loader: Iterable,
    device: str = "cpu",
) -> Tensor:
    """Dense Hessian (float64) of the mean of ``func`` over all samples of ``loader``."""
    total = None
    count = 0
    hess_func = jacrev(jacrev(func))  # reverse-over-reverse: fastest for small dense Hessians on CPU
    for batch in track(loader, "Hessian"):
        data = to_device(batch, device)
        n = batch_size_of(data)
        block = hess_func(params, data).detach().to(torch.float64) * n
        total = block if total is None else total + block
        count += n
    if total is None:
        msg = "the training loader is empty: cannot form the Hessian"
        raise NumericalError(msg)
    return total / count


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
        "set `regularization` to a positive value, e.g. attributor.regularization=0.01"
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
        return SymmetricInverse(chol, None, {"positive_definite": True, "min_pivot": smallest, "max_pivot": largest})
    lu, piv, info = torch.linalg.lu_factor_ex(sym)
    pivots = lu.diagonal().abs()
    smallest, largest = float(pivots.min()), float(pivots.max())
    if int(info) != 0 or largest == 0.0 or smallest <= eps * largest:
        raise _singular(what, regularization, smallest, largest)
    return SymmetricInverse(lu, piv, {"positive_definite": False, "min_pivot": smallest, "max_pivot": largest})
