"""Fitting a final linear layer for representer points: ``Theta* = sum_i a_i x_i^T``.

``L(Theta) = mean_i l(Theta x_i, y_i) + l2_strength * ||Theta||_F^2`` over features
``x_i`` and targets ``y_i`` (the trained model's own outputs) is strictly convex for the
two losses whose derivative in the outputs is known in closed form (``loss``):

* ``"cross_entropy"`` (task=classification): soft targets ``softmax(z)``; binary
  cross-entropy with a sigmoid for one output;
* ``"squared_error"`` (task=regression): ``mean_d (z_d - y_d)^2``, the task's squared
  error per sample (mean over the outputs), targets the model's outputs themselves: a
  ridge regression, which Newton's method solves in one step.

:func:`finetune_final_layer` minimises it by Newton's method in float64 (CG steps on
analytic Hessian-vector products, backtracking line search), and at the optimum
:func:`representer_coefficients` gives the ``a_i = -dl_i/dz / (2 * l2_strength * n)`` of
the representer theorem. Used by :class:`dattri_cli.algorithm.rps.RPSAttributor`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from dattri_cli import distributed
from dattri_cli.func.hessian import batched_cg

#: the final layer's losses with a closed-form derivative in its outputs
LOSSES = ("cross_entropy", "squared_error")
#: the loss of each task group the representer theorem applies to (others are refused)
TASK_LOSSES = {"classification": "cross_entropy", "regression": "squared_error"}


def check_loss(loss: str) -> None:
    """Refuse a loss the representer fit has no closed form for, naming the tasks that work."""
    if loss not in LOSSES:
        msg = (
            "RPS fits the final linear layer only for final_layer_loss='cross_entropy' (task=classification) "
            f"or 'squared_error' (task=regression), got {loss!r}; use attributor=grad_dot, trak or if_ekfac "
            "for this task"
        )
        raise ValueError(msg)


def soft_targets(logits: Tensor, loss: str = "cross_entropy") -> Tensor:
    """The model's own predictions as targets: probabilities (sigmoid for one output, softmax otherwise)
    for cross-entropy, the outputs themselves for squared error."""
    if loss == "squared_error":
        return logits
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def output_gradient(outputs: Tensor, targets: Tensor, loss: str = "cross_entropy") -> Tensor:
    """``dl_i/dz_i`` of each sample's loss in the layer's outputs ``z_i`` (``(n, c)``)."""
    if loss == "squared_error":
        return 2.0 * (outputs - targets) / outputs.shape[1]
    return soft_targets(outputs) - targets


def representer_coefficients(
    theta: Tensor, features: Tensor, targets: Tensor, l2_strength: float, loss: str = "cross_entropy"
) -> Tensor:
    """``a_i = -dl_i/dz / (2 * l2_strength * n)``, so that ``Theta* = sum_i a_i x_i^T`` at the optimum."""
    return -output_gradient(features @ theta.T, targets, loss) / (2.0 * l2_strength * features.shape[0])


class FinalLayerObjective:
    """``L(Theta) = mean_i l(Theta x_i, y_i) + l2_strength * ||Theta||_F^2`` with analytic derivatives.

    Loss, gradient and Hessian-vector products are sums over samples divided by
    the sample count; under torchrun (inside :func:`distributed.split_reductions`)
    every rank gathers the features and targets of all rows (``(n, h)``: small) and
    evaluates the whole training set's objective itself, so every rank takes the
    optimisation steps of one process, bit for bit, whatever the number of ranks.
    """

    def __init__(
        self, features: Tensor, targets: Tensor, l2_strength: float, loss: str = "cross_entropy"
    ) -> None:
        """``features`` ``(n, h)`` and ``targets`` ``(n, c)`` (soft, for cross-entropy), both float64."""
        check_loss(loss)
        features, targets = distributed.all_rows(features), distributed.all_rows(targets)
        self.features, self.targets, self.l2_strength = features, targets, l2_strength
        self.loss_name = loss
        self.count = features.shape[0]

    def _mean(self, local_sum: Tensor) -> Tensor:
        return local_sum / self.count

    def loss(self, theta: Tensor) -> float:
        """The objective's value."""
        logits = self.features @ theta.T
        if self.loss_name == "squared_error":
            per_sample = (logits - self.targets).square().sum() / logits.shape[1]
        elif logits.shape[1] == 1:
            per_sample = nn.functional.binary_cross_entropy_with_logits(logits, self.targets, reduction="sum")
        else:
            per_sample = -(self.targets * torch.log_softmax(logits, dim=1)).sum()
        return float(self._mean(per_sample.reshape(1))) + self.l2_strength * float(theta.square().sum())

    def gradient(self, theta: Tensor) -> Tuple[Tensor, Tensor]:
        """The gradient and the outputs' predictions at ``theta`` (reused by :meth:`hvp`)."""
        outputs = self.features @ theta.T
        residual = output_gradient(outputs, self.targets, self.loss_name)
        grad = self._mean(residual.T @ self.features) + 2.0 * self.l2_strength * theta
        return grad, soft_targets(outputs, self.loss_name)

    def hvp(self, probs: Tensor, direction: Tensor) -> Tensor:
        """Hessian at the point with ``probs`` times ``direction`` (same shape as ``theta``)."""
        change = self.features @ direction.T  # how the logits move
        if self.loss_name == "squared_error":  # d^2 l / dz^2 = 2 / c
            curved = 2.0 * change / change.shape[1]
        elif probs.shape[1] == 1:  # sigmoid: d(prob)/d(logit) = p (1 - p)
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
    loss: str = "cross_entropy",
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
    objective = FinalLayerObjective(features, targets, l2_strength, loss)
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
