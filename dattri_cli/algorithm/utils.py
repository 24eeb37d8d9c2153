"""Small checks and conversions shared by the attributors."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from dattri_cli.errors import ConfigError, NumericalError


def check_not_shuffled(loader: DataLoader, name: str) -> None:
    """Refuse a shuffled loader: scores are matched to samples by position."""
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        msg = f"{name} is shuffled; build it with shuffle=False so scores line up with samples"
        raise ConfigError(msg)


def num_samples(loader: DataLoader) -> int:
    """Number of samples a loader yields."""
    return len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)


def to_device(batch: Union[Tensor, Sequence[Tensor]], device: Union[str, torch.device]) -> Tuple[Tensor, ...]:
    """A batch as a tuple of tensors on ``device``."""
    if isinstance(batch, Tensor):
        batch = (batch,)
    return tuple(t.to(device) for t in batch)


def batch_size_of(batch: Union[Tensor, Sequence[Tensor]]) -> int:
    """Leading dimension of a batch."""
    first = batch if isinstance(batch, Tensor) else batch[0]
    return int(first.shape[0])


def check_finite(tensor: Tensor, stage: str, hint: str) -> None:
    """Stop with a message naming the stage if ``tensor`` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        msg = f"non-finite values (NaN/Inf) in {stage}; {hint}"
        raise NumericalError(msg)
