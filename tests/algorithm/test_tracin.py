"""TracIn / Grad-Dot / Grad-Cos against analytic logistic-regression gradients."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.errors import ConfigError
from tests.algorithm.binary_logistic import _checkpoint, _data, _task


def _analytic_grads(ckpt: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-sample BCE gradient: (sigmoid(w.x + b) - y) * [x, 1]."""
    residual = torch.sigmoid(x @ ckpt["weight"][0] + ckpt["bias"][0]) - y
    return residual[:, None] * torch.cat([x, torch.ones(len(x), 1)], dim=1)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


TRAIN = _data(23, seed=0)
TEST = _data(9, seed=1)


def _scores(
    checkpoints: List[Dict[str, Tensor]], weights: List[float], normalized: bool, **kwargs: object
) -> Tensor:
    attributor = TracInAttributor(
        _task(checkpoints), weight_list=torch.tensor(weights), normalized_grad=normalized, **kwargs
    )
    attributor.cache()
    return attributor.attribute(_loader(*TRAIN, batch_size=5), _loader(*TEST, batch_size=4))


def test_grad_dot_equals_analytic_products() -> None:
    ckpt = _checkpoint(3)
    expected = _analytic_grads(ckpt, *TRAIN) @ _analytic_grads(ckpt, *TEST).T
    scores = _scores([ckpt], [1.0], normalized=False)
    assert scores.shape == (23, 9)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_tracin_is_learning_rate_weighted_sum_over_checkpoints() -> None:
    ckpts = [_checkpoint(3), _checkpoint(4), _checkpoint(5)]
    lrs = [0.1, 0.05, 0.3]
    expected = sum(lr * _analytic_grads(c, *TRAIN) @ _analytic_grads(c, *TEST).T for c, lr in zip(ckpts, lrs))
    torch.testing.assert_close(_scores(ckpts, lrs, normalized=False), expected, rtol=1e-5, atol=1e-6)


def test_grad_cos_equals_cosine_similarity() -> None:
    ckpt = _checkpoint(3)
    g_train = nn.functional.normalize(_analytic_grads(ckpt, *TRAIN), dim=1)
    g_test = nn.functional.normalize(_analytic_grads(ckpt, *TEST), dim=1)
    scores = _scores([ckpt], [1.0], normalized=True)
    torch.testing.assert_close(scores, g_train @ g_test.T, rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1 + 1e-5


def test_identity_projection_is_exact() -> None:
    ckpt = _checkpoint(3)
    exact = _scores([ckpt], [1.0], normalized=False)
    torch.testing.assert_close(
        _scores([ckpt], [1.0], normalized=False, projector_kwargs={"proj_type": "identity"}), exact
    )


def test_projection_seed_changes_scores_and_fixed_seed_reproduces_them() -> None:
    ckpts = [_checkpoint(3), _checkpoint(4)]
    kwargs = {"proj_dim": 4, "proj_seed": 7}
    first = _scores(ckpts, [1.0, 1.0], normalized=False, projector_kwargs=kwargs)
    assert torch.equal(first, _scores(ckpts, [1.0, 1.0], normalized=False, projector_kwargs=kwargs))
    other = _scores(ckpts, [1.0, 1.0], normalized=False, projector_kwargs={**kwargs, "proj_seed": 8})
    assert not torch.allclose(first, other)


def test_large_projection_approximates_exact_scores() -> None:
    ckpt = _checkpoint(3)
    exact = _scores([ckpt], [1.0], normalized=True)
    approx = _scores([ckpt], [1.0], normalized=True, projector_kwargs={"proj_dim": 2048})
    assert (approx - exact).abs().max() < 0.15


def test_two_identical_checkpoints_equal_one() -> None:
    # TracIn sums over checkpoints: the same checkpoint twice at half weight is one
    # checkpoint at full weight (unprojected; each checkpoint has its own projection).
    ckpt = _checkpoint(3)
    two = _scores([ckpt, ckpt], [0.5, 0.5], normalized=False)
    torch.testing.assert_close(two, _scores([ckpt], [1.0], normalized=False))


def test_weight_list_must_match_checkpoints() -> None:
    with pytest.raises(ConfigError, match="one weight per checkpoint"):
        _scores([_checkpoint(3)], [1.0, 2.0], normalized=False)


@pytest.mark.parametrize("normalized", [False, True])
def test_self_attribute_is_the_diagonal_of_train_by_train(normalized):
    x, y = _data(13, 7)
    task = _task([_checkpoint(1), _checkpoint(2)])
    attributor = TracInAttributor(task, weight_list=[0.3, 0.05], normalized_grad=normalized)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    # the task's target defaults to its loss, so attributing train vs train gives the full matrix
    full = attributor.attribute(loader, loader)
    diagonal = attributor.self_attribute(loader)
    assert diagonal.shape == (13,)
    torch.testing.assert_close(diagonal, torch.diagonal(full), rtol=1e-5, atol=1e-6)
