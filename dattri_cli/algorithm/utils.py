"""Small checks and conversions shared by the attributors."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.func.batch import batch_size_of, to_device

__all__ = ["batch_size_of", "check_finite", "check_not_shuffled", "num_samples", "to_device"]


def check_not_shuffled(loader: DataLoader, name: str) -> None:
    """Refuse a shuffled loader: scores are matched to samples by position."""
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        msg = f"{name} is shuffled; build it with shuffle=False so scores line up with samples"
        raise ConfigError(msg)


def num_samples(loader: DataLoader) -> int:
    """Number of samples a loader yields."""
    return len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)


def check_finite(tensor: Tensor, stage: str, hint: str) -> None:
    """Stop with a message naming the stage if ``tensor`` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        msg = f"non-finite values (NaN/Inf) in {stage}; {hint}"
        raise NumericalError(msg)
