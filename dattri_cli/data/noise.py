"""Seeded label noise: flip a fraction of the training labels, and say which.

Applied to a built :class:`~dattri_cli.data.Split` (any dataset, built-in or your
own), so an attribution run and its ground truth see the same flipped labels when
their configs share ``dataset.label_noise`` and ``dataset.label_noise_seed``.
Test labels are never touched: the test set measures the clean task.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

import torch
from torch import Tensor

from dattri_cli.data import Split
from dattri_cli.errors import ConfigError

NOISE_KEYS = ("label_noise", "label_noise_seed")


def flip_labels(split: Split, fraction: float, seed: int) -> Tuple[Split, Tensor]:
    """A copy of ``split`` with ``round(fraction * n_train)`` train labels moved to another class.

    Returns the new split and an int64 mask ``(n_train,)``, 1 where a label was flipped.
    Each flipped label gets a uniformly drawn *different* class, so it is always wrong.
    """
    if not 0.0 <= fraction <= 1.0:
        msg = f"dataset.label_noise must be a fraction in [0, 1], got {fraction}"
        raise ConfigError(msg)
    n = int(split.y_train.shape[0])
    mask = torch.zeros(n, dtype=torch.int64)
    count = round(fraction * n)
    if count == 0:
        return split, mask
    num_classes = split.num_classes
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(n, generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    labels = split.y_train.clone()
    labels[positions] = (labels[positions] + shift) % num_classes
    mask[positions] = 1
    return replace(split, y_train=labels), mask
