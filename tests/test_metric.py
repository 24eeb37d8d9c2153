"""LDS / LOO / AUC primitives on synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dattri_cli import metric


def _linear_world(n_train=40, n_test=6, m=30, k=20, seed=0):
    """Targets that are exactly minus the sum of 'true' scores over each subset."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n_train, n_test))
    subsets = np.stack([rng.permutation(n_train)[:k] for _ in range(m)])
    targets = -true[subsets].sum(axis=1) + 3.0  # an offset changes no rank
    return torch.tensor(true), torch.tensor(subsets), torch.tensor(targets)


def test_lds_perfect_anti_and_random():
    scores, subsets, targets = _linear_world()
    perfect = metric.lds(scores, subsets, targets, bootstrap=200)
    assert perfect.mean == pytest.approx(1.0)
    assert perfect.ci_low == pytest.approx(1.0) and perfect.ci_high == pytest.approx(1.0)
    assert metric.lds(-scores, subsets, targets, bootstrap=50).mean == pytest.approx(-1.0)
    noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rand = metric.lds(noise, subsets, targets, bootstrap=200)
    assert abs(rand.mean) < 0.25
    assert rand.ci_low < rand.mean < rand.ci_high


def test_lds_sign_positive_scores_lower_the_loss():
    # one train sample that helps every test sample: subsets holding it have lower loss
    n_train, n_test = 10, 3
    scores = torch.zeros(n_train, n_test)
    scores[0] = 1.0
    scores[1:] = torch.linspace(0.01, 0, 9)[:, None]  # tiny, distinct: later samples help less
    subsets = torch.tensor([[0, 1], [2, 3], [0, 4], [5, 6], [7, 8], [0, 9]])
    loss = torch.tensor([0.1, 0.9, 0.15, 0.95, 0.99, 0.2])[:, None].repeat(1, n_test)
    assert metric.lds(scores, subsets, loss, bootstrap=10).mean == pytest.approx(1.0)
    assert metric.lds(-scores, subsets, loss, bootstrap=10).mean == pytest.approx(-1.0)


def test_lds_constant_targets_are_skipped():
    scores, subsets, targets = _linear_world()
    targets[:, 0] = 1.0
    result = metric.lds(scores, subsets, targets, bootstrap=10)
    assert np.isnan(result.per_test[0]) and result.n_valid == targets.shape[1] - 1
    assert result.mean == pytest.approx(1.0)


def test_loo_perfect_anti_random():
    rng = np.random.default_rng(1)
    scores = torch.tensor(rng.normal(size=(30, 5)))
    idx = torch.arange(0, 30, 2)
    full = torch.tensor(rng.normal(size=5))
    loo = full[None, :] + 0.5 * scores[idx]  # removing a helper raises the loss
    assert metric.loo_correlation(scores, idx, loo, full) == pytest.approx(1.0)
    assert metric.loo_correlation(-scores, idx, loo, full) == pytest.approx(-1.0)
    noise = torch.tensor(rng.normal(size=(30, 5)))
    assert abs(metric.loo_correlation(noise, idx, loo, full)) < 0.4


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.2
    signal = rng.normal(size=200) + labels
    if seed % 2:  # ties, which both count one half
        signal = np.round(signal, 0)
    assert metric.auc(labels, signal) == pytest.approx(roc_auc_score(labels, signal), abs=1e-12)


def test_auc_edges():
    assert metric.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metric.auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    with pytest.raises(ValueError):
        metric.auc([1, 1], [0.1, 0.2])
    assert metric.mislabel_auc(np.zeros(4), np.arange(4)) is None


def test_harm_signal_ranks_harmful_first():
    scores = torch.tensor([[1.0, 1.0], [-2.0, -1.0], [0.5, 0.0]])
    assert metric.mislabel_auc([0, 1, 0], metric.harm_signal(scores)) == 1.0
