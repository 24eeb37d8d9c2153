"""Small checks and conversions shared by the attributors (tensor-level ones re-exported from ``func``)."""

from __future__ import annotations

from torch.utils.data import DataLoader, RandomSampler

from dattri_cli.errors import ConfigError
from dattri_cli.func.batch import batch_size_of, to_device
from dattri_cli.func.utils import check_finite

__all__ = ["batch_size_of", "check_finite", "check_not_shuffled", "num_samples", "to_device"]


def check_not_shuffled(loader: DataLoader, name: str) -> None:
    """Refuse a shuffled loader: scores are matched to samples by position."""
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        msg = f"{name} is shuffled; build it with shuffle=False so scores line up with samples"
        raise ConfigError(msg)


def num_samples(loader: DataLoader) -> int:
    """Number of samples a loader yields."""
    return len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
