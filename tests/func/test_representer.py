"""Final-layer fitting for representer points: the optimum satisfies the representer theorem."""

from __future__ import annotations

import pytest
import torch

from dattri_cli.func.representer import (
    FinalLayerObjective,
    finetune_final_layer,
    representer_coefficients,
    soft_targets,
)


def _problem(classes: int) -> tuple:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    targets = soft_targets(torch.randn(40, classes, generator=gen, dtype=torch.float64))
    theta = torch.randn(classes, 5, generator=gen, dtype=torch.float64)
    return features, targets, theta


@pytest.mark.parametrize("classes", [1, 3])
def test_optimum_is_the_sum_of_representers(classes: int) -> None:
    features, targets, theta0 = _problem(classes)
    theta, residual = finetune_final_layer(features, targets, theta0, l2_strength=0.05, max_iter=30)
    assert residual < 1e-10
    alpha = representer_coefficients(theta, features, targets, 0.05)
    torch.testing.assert_close(alpha.T @ features, theta, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("classes", [1, 3])
def test_gradient_and_hvp_match_autograd(classes: int) -> None:
    features, targets, theta = _problem(classes)
    objective = FinalLayerObjective(features, targets, 0.05)
    direction = torch.randn_like(theta)

    def loss(t: torch.Tensor) -> torch.Tensor:
        logits = features @ t.T
        if classes == 1:
            ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="mean")
        else:
            ce = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return ce + 0.05 * t.square().sum()

    grad, probs = objective.gradient(theta)
    torch.testing.assert_close(grad, torch.func.grad(loss)(theta))
    _, hvp = torch.func.jvp(torch.func.grad(loss), (theta,), (direction,))
    torch.testing.assert_close(objective.hvp(probs, direction), hvp)


def test_squared_error_fit_is_the_ridge_solution_and_a_sum_of_representers() -> None:
    """Squared error: the optimum is ridge regression, written here as a linear solve."""
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    outputs = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    targets = soft_targets(outputs, "squared_error")
    assert torch.equal(targets, outputs)  # the model's own outputs are the targets
    n, c, lam = 40, 2, 0.05
    # d/dTheta [ 1/(n c) ||X Theta^T - Y||^2 + lam ||Theta||^2 ] = 0  <=>  Theta (X^T X + n c lam I) = Y^T X
    ridge = torch.linalg.solve(
        features.T @ features + n * c * lam * torch.eye(5, dtype=torch.float64), features.T @ targets
    ).T
    theta, residual = finetune_final_layer(
        features, targets, torch.zeros(2, 5, dtype=torch.float64), lam, max_iter=30, loss="squared_error"
    )
    assert residual < 1e-10
    torch.testing.assert_close(theta, ridge, rtol=1e-9, atol=1e-11)
    alpha = representer_coefficients(theta, features, targets, lam, "squared_error")
    torch.testing.assert_close(alpha.T @ features, theta, rtol=1e-8, atol=1e-10)


def test_squared_error_derivatives_match_autograd() -> None:
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    targets = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    theta, direction = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    objective = FinalLayerObjective(features, targets, 0.05, "squared_error")

    def loss(t: torch.Tensor) -> torch.Tensor:  # the task's squared error: mean over samples and outputs
        return ((features @ t.T - targets) ** 2).mean() + 0.05 * t.square().sum()

    grad, preds = objective.gradient(theta)
    torch.testing.assert_close(grad, torch.func.grad(loss)(theta))
    torch.testing.assert_close(objective.loss(theta), float(loss(theta)))
    _, hvp = torch.func.jvp(torch.func.grad(loss), (theta,), (direction,))
    torch.testing.assert_close(objective.hvp(preds, direction), hvp)


def test_a_loss_without_a_closed_form_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"got 'task=causal_lm'; use attributor=grad_dot") as info:
        FinalLayerObjective(torch.zeros(2, 3), torch.zeros(2, 1), 0.1, "task=causal_lm")
    assert "\n" not in str(info.value) and "task=regression" in str(info.value)
