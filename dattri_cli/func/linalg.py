"""Symmetric eigendecompositions that do not fail on finite K-FAC / EK-FAC factors.

A factor ``A`` (an activation or output-gradient second moment) is symmetric
positive semi-definite in exact arithmetic, ``A = Q diag(lambda) Q^T``. In floating
point ``torch.linalg.eigh`` can still fail to converge or return NaN on a finite
factor: float32 overflow inside LAPACK, strongly ill-conditioned or rank-deficient
factors (a ResNet-18's last convolutions see 1x1 maps at 32x32 input, so 4,224 of the
4,608 rows of their unfolded-activation factor are exactly zero), or a GPU solver that
gives up. :func:`robust_eigh` first tries the plain call, unchanged (so factors that
decompose keep their bits), and only when it raises or returns a non-finite result
climbs a ladder. A factor at least :data:`SPLIT_MIN_DIM` wide that has exactly-zero rows
skips the plain call and starts on the ladder with its zero rows split off: such a
factor is where the plain call fails (ResNet-18's 4,609-wide factor, after a slow failed
attempt), and decomposing only the live block (a few hundred rows instead of thousands;
eigh is cubic) is far cheaper. Smaller factors keep the plain call and their bits.
The ladder:

1. float64 and the symmetrised ``(A + A^T) / 2``;
2. rows and columns that are exactly zero are split off: each is an eigenvector
   ``e_k`` with eigenvalue 0, and only the remaining block is decomposed;
3. a jitter ``eps * mean|diag|`` is added to the block with growing ``eps``
   (:data:`JITTERS`) until ``eigh`` converges, then subtracted from the eigenvalues
   (``A + cI`` has the eigenvectors of ``A`` and eigenvalues shifted by ``c``), on the
   factor's device and, failing that, on the CPU.

The result is returned in the factor's dtype and device, eigenvalues ascending and
eigenvectors as orthonormal columns. A :class:`~dattri_cli.errors.NumericalError`
is raised at once when the factor holds NaN or Inf (no ladder can fix the data),
and only then in practice: the last rung (float64 on the CPU with a 10% jitter)
converges for any finite symmetric matrix.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from dattri_cli.errors import NumericalError

#: Relative jitters tried in turn (times the mean absolute diagonal of the nonzero block).
JITTERS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1)
#: Factors at least this wide have their zero rows split off before any eigh. Below it a plain
#: eigh costs well under a second even when it fails, and existing results keep their bits;
#: above it a failed plain call on a mostly-zero factor costs seconds to tens of seconds.
SPLIT_MIN_DIM = 1024


def _try_eigh(mat: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``eigh(mat)`` or None when it raises or returns a non-finite result."""
    try:
        evals, evecs = torch.linalg.eigh(mat)
    except (RuntimeError, torch.linalg.LinAlgError):  # LinAlgError subclasses RuntimeError
        return None
    if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
        return None
    return evals, evecs


def zero_rows(mat: Tensor) -> Tensor:
    """Boolean mask of the indices whose row and column are both exactly zero."""
    return (mat == 0).all(dim=0) & (mat == 0).all(dim=1)


def robust_eigh(mat: Tensor, name: str = "factor") -> Tuple[Tensor, Tensor]:
    """``(eigenvalues ascending, eigenvectors as columns)`` of a symmetric factor, without failing.

    See the module docstring for the ladder. ``name`` appears in the error and in the
    warning that reports when the ladder was needed.
    """
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        msg = f"{name}: expected a square matrix, got shape {tuple(mat.shape)}"
        raise ValueError(msg)
    bad = int((~torch.isfinite(mat)).sum())
    if bad:
        msg = (
            f"{name} holds {bad} NaN/Inf entries of {mat.numel()}: the data, the checkpoint or the loss "
            "produced non-finite gradients; check them (no eigendecomposition can repair this)"
        )
        raise NumericalError(msg)
    if mat.shape[0] >= SPLIT_MIN_DIM and bool(zero_rows(mat).any()):
        evals, evecs, jitter, zeros = _ladder(mat, name)
        if jitter:
            warnings.warn(
                f"{name}: {zeros} zero rows split off; eigh of the rest needed a jitter of {jitter:g} x "
                "mean|diag| (subtracted from the eigenvalues)",
                stacklevel=2,
            )
        return evals.to(mat.dtype), evecs.to(mat.dtype)
    plain = _try_eigh(mat)
    if plain is not None:
        return plain
    evals, evecs, jitter, zeros = _ladder(mat, name)
    warnings.warn(
        f"{name}: torch.linalg.eigh failed on the {mat.dtype} factor; decomposed in float64, symmetrised, "
        f"{zeros} zero rows split off, jitter {jitter:g} x mean|diag| (subtracted from the eigenvalues)",
        stacklevel=2,
    )
    return evals.to(mat.dtype), evecs.to(mat.dtype)


def _ladder(mat: Tensor, name: str) -> Tuple[Tensor, Tensor, float, int]:
    n = mat.shape[0]
    sym = mat.to(torch.float64)
    sym = 0.5 * (sym + sym.T)
    dead = zero_rows(sym)
    live = (~dead).nonzero().flatten()
    block = sym[live][:, live]
    result = _jittered(block) if block.numel() else (block.new_zeros(0), block.new_zeros(0, 0), 0.0)
    if result is None:  # pragma: no cover - float64 on the CPU with a 10% jitter converges for finite input
        msg = f"{name}: eigh did not converge even in float64 with a jitter of {JITTERS[-1]:g} x mean|diag|"
        raise NumericalError(msg)
    sub_evals, sub_evecs, jitter = result
    sub_evals, sub_evecs = sub_evals.to(mat.device), sub_evecs.to(mat.device)
    live, dead_idx = live.to(mat.device), dead.nonzero().flatten().to(mat.device)
    evals = torch.cat([sub_evals.new_zeros(dead_idx.numel()), sub_evals])
    evecs = sym.new_zeros(n, n)
    evecs[dead_idx, torch.arange(dead_idx.numel(), device=mat.device)] = 1.0
    evecs[live.unsqueeze(1), dead_idx.numel() + torch.arange(live.numel(), device=mat.device)] = sub_evecs
    order = torch.argsort(evals, stable=True)
    return evals[order], evecs[:, order], jitter, int(dead_idx.numel())


def _jittered(block: Tensor) -> Optional[Tuple[Tensor, Tensor, float]]:
    scale = float(block.diagonal().abs().mean())
    if scale == 0.0:
        scale = float(block.abs().max())
    if scale == 0.0:  # pragma: no cover - zero rows were split off, so the block has a nonzero entry
        return block.new_zeros(block.shape[0]), torch.eye(block.shape[0], dtype=block.dtype), 0.0
    eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
    devices = [block.device] + ([torch.device("cpu")] if block.device.type != "cpu" else [])
    for device in devices:
        on = block.to(device)
        for eps in JITTERS:
            shift = eps * scale
            got = _try_eigh(on + shift * eye.to(device))
            if got is not None:
                return got[0] - shift, got[1], eps
    return None
