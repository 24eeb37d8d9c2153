"""The TRAK kernel ``K = Phi^T Phi + regularization I`` and its inverse, applied to columns.

``Phi`` (``n_train x d``) holds projected training gradients; ``K`` is summed over the
training rows in float64. :func:`factor_kernel` factors it by Cholesky with a tiny
relative ridge; a kernel that stays singular (no ``regularization`` and fewer training
rows than projected dimensions, or a direction no gradient varies in) falls back to the
pseudo-inverse from its eigendecomposition, with a warning naming the arguments that
make it invertible.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from dattri_cli.errors import NumericalError

#: Ridge added to the kernel, relative to its mean diagonal entry. Far below
#: float32 gradient noise, it only matters in directions the kernel does not see.
RELATIVE_RIDGE = 1e-9
#: A Cholesky pivot below this many ridges means a (numerically) null direction.
SINGULAR_PIVOTS = 10.0
#: Eigenvalues of a singular kernel below this times ``dim x`` the largest are treated as zero
#: (the features are float32: their products carry about that much rounding).
PSEUDO_INVERSE_RTOL = 1.2e-7
#: A ridge value that messages suggest (the CLI's default in configs/attributor/trak.yaml).
DEFAULT_REGULARIZATION_HINT = 1e-4


@dataclass
class KernelSolver:
    """``(Phi^T Phi + regularization I)^-1`` of one checkpoint, applied to columns.

    A Cholesky factor when the kernel is positive definite; otherwise (no ridge and
    a singular kernel, e.g. fewer training rows than projected dimensions) the
    pseudo-inverse from its eigendecomposition: the limit of the ridge solution as
    the ridge goes to zero, the minimum-norm least-squares fit.
    """

    factor: Optional[Tensor] = None  # lower Cholesky factor, (d, d) float64
    basis: Optional[Tensor] = None  # kept eigenvectors (pseudo-inverse), (d, r) float64
    inverse_values: Optional[Tensor] = None  # their inverse eigenvalues, (r,)
    min_pivot_relative: float = 0.0  # smallest pivot (or eigenvalue) over the mean diagonal

    def solve(self, rhs: Tensor) -> Tensor:
        """``K^-1 rhs`` (or ``K^+ rhs``) for a float64 ``(d, m)`` right-hand side."""
        if self.factor is not None:
            return torch.cholesky_solve(rhs, self.factor)
        return self.basis @ (self.inverse_values[:, None] * (self.basis.T @ rhs))


def factor_kernel(
    kernel: Tensor,
    num_train: int,
    regularization: float = 0.0,
    rows: Optional[Callable[[], Tensor]] = None,
) -> KernelSolver:
    """Factor the float64 kernel ``Phi^T Phi + regularization I`` (summed over ``num_train`` rows).

    A tiny relative ridge keeps Cholesky stable. When the kernel is singular all the
    same (only possible without ``regularization``), the pseudo-inverse is used and a
    warning names the arguments that make the kernel invertible.

    ``rows()``, when given, returns ``Phi`` itself (``num_train x dim``): a singular kernel
    with fewer rows than dimensions then gets its pseudo-inverse from the small Gram matrix
    ``Phi Phi^T`` (:func:`pseudo_inverse_from_rows`: ``num_train^3`` instead of ``dim^3``; 0.1 s
    instead of several seconds at 256 rows of 2.6k Kronecker features). The same operator up
    to rounding, not the same bits: callers pass it only where bits may differ from the
    ``dim x dim`` eigendecomposition (TRAK on the layers backend).
    """
    dim = kernel.shape[0]
    kernel = kernel.clone()
    scale = kernel.diagonal().mean()
    if not bool(torch.isfinite(scale)) or scale <= 0:
        msg = (
            "the TRAK kernel Phi^T Phi is zero or non-finite: all training gradients vanish; "
            "check the checkpoint and the loss"
        )
        raise NumericalError(msg)
    if regularization > 0:  # dattri 0.3.0: added to the kernel's diagonal before the solve
        kernel.diagonal().add_(regularization)
    ridge = RELATIVE_RIDGE * scale
    with_ridge = kernel.clone()
    with_ridge.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(with_ridge)
    if int(info) == 0 and bool(factor.diagonal().square().min() >= SINGULAR_PIVOTS * ridge):
        pivots = factor.diagonal().square()
        return KernelSolver(
            factor=factor, min_pivot_relative=float(pivots.min() / factor.square().sum(dim=1).mean())
        )
    why = (
        f"{num_train} training samples for {dim} projected dimensions"
        if num_train < dim
        else "some projected gradient direction never varies"
    )
    warnings.warn(
        f"the TRAK kernel Phi^T Phi is singular ({why}); using its pseudo-inverse. Add a ridge "
        f"(e.g. regularization={DEFAULT_REGULARIZATION_HINT}) or lower "
        f'projector_kwargs["proj_dim"] (e.g. projector_kwargs["proj_dim"]='
        f"{_power_of_two_at_most(min(num_train, max(dim // 4, 1)))})",
        RuntimeWarning,
        stacklevel=3,
    )
    if rows is not None and num_train < dim:
        return pseudo_inverse_from_rows(rows(), dim)
    values, vectors = torch.linalg.eigh(kernel)
    keep = values > values.max() * dim * PSEUDO_INVERSE_RTOL
    return KernelSolver(basis=vectors[:, keep], inverse_values=1.0 / values[keep], min_pivot_relative=0.0)


def pseudo_inverse_from_rows(phi: Tensor, dim: Optional[int] = None) -> KernelSolver:
    """``(Phi^T Phi)^+`` for a wide ``Phi`` (``n x d``, ``n < d``) from the ``n x n`` Gram matrix.

    With ``Phi Phi^T = U diag(s) U^T``, the kernel ``Phi^T Phi`` has the same non-zero
    eigenvalues ``s`` and eigenvectors ``V = Phi^T U diag(s)^-1/2``, so its pseudo-inverse
    is ``V diag(1/s) V^T``: a :class:`KernelSolver` with ``basis = V``. Eigenvalues at most
    ``PSEUDO_INVERSE_RTOL * dim`` times the largest count as zero, as for the kernel's
    own eigendecomposition (``dim`` defaults to ``d``).
    """
    wide = phi.to(torch.float64)
    dim = wide.shape[1] if dim is None else dim
    values, vectors = torch.linalg.eigh(wide @ wide.T)
    keep = values > values.max() * dim * PSEUDO_INVERSE_RTOL
    values = values[keep]
    basis = (wide.T @ vectors[:, keep]) / values.sqrt()
    return KernelSolver(basis=basis, inverse_values=1.0 / values, min_pivot_relative=0.0)


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(int(n).bit_length() - 1, 0)
