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
