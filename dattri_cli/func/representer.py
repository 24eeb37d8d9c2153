"""Fitting a final linear layer for representer points: ``Theta* = sum_i a_i x_i^T``.

``L(Theta) = mean_i CE(Theta x_i, y_i) + l2_strength * ||Theta||_F^2`` over features
``x_i`` with soft targets ``y_i`` (binary cross-entropy with a sigmoid for one output)
is strictly convex; :func:`finetune_final_layer` minimises it by Newton's method in
float64 (CG steps on analytic Hessian-vector products, backtracking line search), and
at the optimum :func:`representer_coefficients` gives the ``a_i`` of the representer
theorem. Used by :class:`dattri_cli.algorithm.rps.RPSAttributor`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from dattri_cli import distributed
from dattri_cli.func.hessian import batched_cg


def soft_targets(logits: Tensor) -> Tensor:
    """The model's predicted probabilities: sigmoid for one output, softmax otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def representer_coefficients(theta: Tensor, features: Tensor, targets: Tensor, l2_strength: float) -> Tensor:
    """``a_i = -dl_i/dlogits / (2 * l2_strength * n)``, so that ``Theta* = sum_i a_i x_i^T`` at the optimum."""
    residual = soft_targets(features @ theta.T) - targets  # d(per-sample CE)/d(logits)
    return -residual / (2.0 * l2_strength * features.shape[0])


class FinalLayerObjective:
    """``L(Theta) = mean_i CE(Theta x_i, y_i) + l2_strength * ||Theta||_F^2`` with analytic derivatives.

    Loss, gradient and Hessian-vector products are sums over samples divided by
    the sample count; under torchrun (inside :func:`distributed.split_reductions`)
    every rank gathers the features and targets of all rows (``(n, h)``: small) and
    evaluates the whole training set's objective itself, so every rank takes the
    optimisation steps of one process, bit for bit, whatever the number of ranks.
    """

    def __init__(self, features: Tensor, targets: Tensor, l2_strength: float) -> None:
        """``features`` ``(n, h)`` and soft ``targets`` ``(n, c)``, both float64."""
        features, targets = distributed.all_rows(features), distributed.all_rows(targets)
        self.features, self.targets, self.l2_strength = features, targets, l2_strength
        self.count = features.shape[0]

    def _mean(self, local_sum: Tensor) -> Tensor:
        return local_sum / self.count

    def loss(self, theta: Tensor) -> float:
        """The objective's value."""
        logits = self.features @ theta.T
        if logits.shape[1] == 1:
            per_sample = nn.functional.binary_cross_entropy_with_logits(logits, self.targets, reduction="sum")
        else:
            per_sample = -(self.targets * torch.log_softmax(logits, dim=1)).sum()
        return float(self._mean(per_sample.reshape(1))) + self.l2_strength * float(theta.square().sum())

    def gradient(self, theta: Tensor) -> Tuple[Tensor, Tensor]:
        """The gradient and the predicted probabilities at ``theta`` (reused by :meth:`hvp`)."""
        probs = soft_targets(self.features @ theta.T)
        grad = self._mean((probs - self.targets).T @ self.features) + 2.0 * self.l2_strength * theta
        return grad, probs

    def hvp(self, probs: Tensor, direction: Tensor) -> Tensor:
        """Hessian at the point with ``probs`` times ``direction`` (same shape as ``theta``)."""
        change = self.features @ direction.T  # how the logits move
        if probs.shape[1] == 1:  # sigmoid: d(prob)/d(logit) = p (1 - p)
            curved = probs * (1.0 - probs) * change
        else:  # softmax Jacobian: diag(p) - p p^T
            curved = probs * change - probs * (probs * change).sum(dim=1, keepdim=True)
        return self._mean(curved.T @ self.features) + 2.0 * self.l2_strength * direction


def finetune_final_layer(
    features: Tensor,
    targets: Tensor,
    init_theta: Tensor,
    l2_strength: float,
    max_iter: int,
    tol: float = 1e-10,
) -> Tuple[Tensor, float]:
    """L2-regularised fit of the final layer by Newton's method with CG steps.

    The objective is strictly convex, so Newton steps (solved inexactly by
    conjugate gradient on analytic Hessian-vector products, with a backtracking
    line search) converge quadratically: a handful of steps reach float64 round-off
    where first-order methods need hundreds of gradient evaluations. Stops when the
    relative representer residual ``||Theta - sum_i a_i x_i^T|| / ||Theta||``,
    which equals ``||grad|| / (2 * l2_strength * ||Theta||)``, is below ``tol``, or
    after ``max_iter`` Newton steps. Returns the weights and that residual.
    """
    objective = FinalLayerObjective(features, targets, l2_strength)
    theta = init_theta.detach().to(torch.float64).clone()
    residual = math.inf
    for newton_step in range(max(int(max_iter), 0) + 1):
        grad, probs = objective.gradient(theta)
        residual = float(grad.norm() / (2.0 * l2_strength * theta.norm()).clamp_min(1e-300))
        if residual <= tol or not math.isfinite(residual) or newton_step == max_iter:
            break
        step = _newton_direction(objective, probs, grad)
        theta = _backtrack(objective, theta, step, float((grad * step).sum()))
    return theta, residual


def _newton_direction(objective: FinalLayerObjective, probs: Tensor, grad: Tensor) -> Tensor:
    """Solve ``H d = -grad`` by CG to a relative accuracy that tightens as ``grad`` shrinks."""
    shape = grad.shape
    grad_norm = float(grad.norm())
    forcing = min(0.5, math.sqrt(grad_norm)) * grad_norm  # inexact Newton: superlinear convergence

    def matvec(rows: Tensor) -> Tensor:
        return torch.stack([objective.hvp(probs, row.view(shape)).reshape(-1) for row in rows])

    result = batched_cg(matvec, -grad.reshape(1, -1), max_iter=grad.numel(), tol=forcing)
    return result.solution.view(shape)


def _backtrack(objective: FinalLayerObjective, theta: Tensor, step: Tensor, slope: float) -> Tensor:
    """Armijo backtracking along ``step`` from ``theta`` (a full step near the optimum)."""
    start, scale = objective.loss(theta), 1.0
    while scale > 1e-12:
        candidate = theta + scale * step
        if objective.loss(candidate) <= start + 1e-4 * scale * slope:
            return candidate
        scale *= 0.5
    return theta
