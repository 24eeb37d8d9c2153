"""Hessians of the mean training loss and solves against them.

Everything here knows only a function ``f(flat_params, batch) -> mean loss`` and
a loader; nothing about attributors. The Hessian of the mean loss over the whole
training set is accumulated batch by batch with weights ``batch_size / N``, so the
answer does not depend on how the loader is batched (when ``f`` is a batch mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor
from torch.func import hessian

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
    hess_func = hessian(func)
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
    """``(H + reg I)^-1`` from an eigendecomposition, with diagnostics."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    diagnostics: Dict[str, float] = field(default_factory=dict)

    def apply(self, rhs: Tensor) -> Tensor:
        """``(H + reg I)^-1 @ rhs.T`` returned as rows: rhs is ``(k, P)``."""
        v = self.eigenvectors
        coeff = (rhs.to(v.dtype) @ v) / self.eigenvalues
        return (coeff @ v.T).to(rhs.dtype)


def symmetric_inverse(matrix: Tensor, regularization: float, what: str = "Hessian") -> SymmetricInverse:
    """Invert ``matrix + regularization * I`` (symmetric), refusing singular cases.

    A matrix whose smallest eigenvalue (in magnitude) is below round-off relative to
    the largest is singular for our purpose: inverting it would return noise, so we
    stop and name the fix instead.
    """
    sym = (matrix + matrix.T) / 2
    sym = sym + regularization * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    if not bool(torch.isfinite(sym).all()):
        msg = f"non-finite values (NaN/Inf) in the {what}; check the data and checkpoint, or increase `regularization`"
        raise NumericalError(msg)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    largest = float(eigenvalues.abs().max())
    smallest = float(eigenvalues.abs().min())
    threshold = largest * sym.shape[0] * torch.finfo(torch.float32).eps
    if largest == 0.0 or smallest <= threshold:
        msg = (
            f"the {what} plus regularization={regularization:g} is singular "
            f"(smallest |eigenvalue| {smallest:.3g}, largest {largest:.3g}); "
            "set `regularization` to a positive value, e.g. attributor.regularization=0.01"
        )
        raise NumericalError(msg)
    diagnostics = {
        "min_eigenvalue": float(eigenvalues.min()),
        "max_eigenvalue": float(eigenvalues.max()),
        "negative_eigenvalues": int((eigenvalues < 0).sum()),
        "condition_number": largest / smallest,
    }
    return SymmetricInverse(eigenvalues, eigenvectors, diagnostics)
