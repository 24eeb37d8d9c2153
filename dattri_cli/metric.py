"""Evaluation primitives: LDS, leave-one-out correlation, mislabel-detection AUC.

Plain tensors in, numbers out: no Hydra, no files. Sign convention of the score
files: ``scores[i, j] > 0`` means training sample ``i`` LOWERS the loss of test
sample ``j``. Targets recorded by ground truth are test losses, so a subset whose
members have large scores should end with a SMALL loss: the predicted target of a
subset is minus the sum of its members' scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b``.

    Columns where either side is constant have no defined correlation: NaN.
    """
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a * b).sum(axis=0) / denom
    corr[denom <= 0] = np.nan
    return np.clip(corr, -1.0, 1.0)


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per column: Pearson of the (tie-averaged) ranks."""
    return column_pearson(rankdata(a, axis=0), rankdata(b, axis=0))


def subset_predictions(scores: Tensor | np.ndarray, subsets: Tensor | np.ndarray) -> np.ndarray:
    """Predicted target change of each subset, ``(M, n_test)``: minus the sum of member scores."""
    s = _as_numpy(scores)
    idx = np.asarray(subsets, dtype=np.int64)
    return -s[idx].sum(axis=1)


@dataclass
class LDSResult:
    """Linear datamodeling score: mean Spearman over test samples, with a bootstrap CI."""

    mean: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray
    n_valid: int


def bootstrap_ci(
    values: np.ndarray, num: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped), seeded."""
    vals = values[~np.isnan(values)]
    if vals.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = vals[rng.integers(0, vals.size, size=(num, vals.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def lds(
    scores: Tensor | np.ndarray,
    subsets: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS of ``scores`` (n_train, n_test) against retraining ``targets`` (M, n_test) on ``subsets``.

    ``subsets`` holds row positions of ``scores`` (M, subset_size). Test samples whose
    targets do not vary across subsets carry no signal and are left out (NaN per test).
    """
    pred = subset_predictions(scores, subsets)
    per_test = column_spearman(pred, _as_numpy(targets))
    valid = ~np.isnan(per_test)
    mean = float(per_test[valid].mean()) if valid.any() else float("nan")
    low, high = bootstrap_ci(per_test, bootstrap, level, seed)
    return LDSResult(mean, low, high, per_test, int(valid.sum()))


def loo_correlation(
    scores: Tensor | np.ndarray,
    loo_indices: Tensor | np.ndarray,
    loo_targets: Tensor | np.ndarray,
    full_targets: Tensor | np.ndarray,
) -> float:
    """Mean over test samples of Pearson(score of removed sample, actual target change).

    Removing a helpful sample (positive score) should RAISE the test loss, so the
    score is correlated with ``loo_target - full_target`` directly.
    """
    s = _as_numpy(scores)[np.asarray(loo_indices, dtype=np.int64)]
    change = _as_numpy(loo_targets) - _as_numpy(full_targets)[None, :]
    per_test = column_pearson(s, change)
    valid = ~np.isnan(per_test)
    return float(per_test[valid].mean()) if valid.any() else float("nan")


def auc(labels: Tensor | np.ndarray, signal: Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``signal`` for binary ``labels`` (1 = positive).

    Mann-Whitney form: the probability that a random positive outranks a random
    negative, ties counted one half. Needs at least one positive and one negative.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = _as_numpy(signal).ravel()
    if y.shape != s.shape:
        msg = f"labels and signal differ in length ({y.size} vs {s.size})"
        raise ValueError(msg)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        msg = "AUC needs both positive and negative labels"
        raise ValueError(msg)
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def harm_signal(scores: Tensor | np.ndarray) -> np.ndarray:
    """How much each training sample hurts the test set: minus its mean score.

    Mislabeled samples tend to raise test loss (negative scores), so they rank high.
    """
    return -_as_numpy(scores).mean(axis=1)


def mislabel_auc(flipped: Tensor | np.ndarray, signal: Tensor | np.ndarray) -> Optional[float]:
    """AUC of ``signal`` for finding the flipped samples; None when nothing (or all) was flipped."""
    y = np.asarray(flipped).astype(bool)
    if y.all() or not y.any():
        return None
    return auc(y, signal)
