"""What the pipeline needs of a split, whatever holds the data: tensors, image folders, tables, your Dataset.

Why: ``dattri run`` started with in-memory ``x`` / ``y`` tensors (:class:`~dattri_cli.data.Split`)
and read ``split.x_train`` directly in several places. Image folders
(:class:`~dattri_cli.data.image_folder.ImageFolderSplit`), tokenised tables
(:class:`~dattri_cli.data.hf_table.TextSplit`) and any ``torch.utils.data.Dataset``
(:class:`DatasetSplit`) hold their samples elsewhere, so the pipeline asks through the
functions here instead:

* :func:`n_train` / :func:`n_test`: row counts (from the positions, never by decoding);
* :func:`train_dataset` / :func:`collate_fn`: the rows as a map-style dataset and how to batch them;
* :func:`row_loader`: an unshuffled loader over training rows ``[start, stop)``, batched
  like the full one (shards, row-block files, torchrun ranks);
* :func:`sample_ndim`: dimensions of one sample's main input (``x``, or ``input_ids`` of
  a dict batch), which tells the task functions a sample from a batch;
* :func:`train_fingerprint`: what keys the feature cache;
* ``split.num_features`` / ``split.num_classes``: filled into model constructors.

A :class:`~dattri_cli.data.Split` goes through exactly the code it went through before
(``TensorDataset`` over its tensors), so its numbers do not change.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dattri_cli.data import (  # noqa: F401 - re-exported: the protocol's generic split
    LABEL_KEY,
    MAIN_INPUT_KEY,
    DatasetSplit,
    DictTensorDataset,
    Split,
    dataset_split,
    first_input,
)


def is_split(obj: Any) -> bool:
    """Whether ``obj`` is a split the pipeline can run (has train/test positions and loaders)."""
    return all(hasattr(obj, name) for name in ("train_indices", "test_indices", "loaders", "fingerprint"))


def n_train(split: Any) -> int:
    """Number of training rows."""
    return int(split.train_indices.numel())


def n_test(split: Any) -> int:
    """Number of test rows."""
    return int(split.test_indices.numel())


def train_dataset(split: Any) -> Dataset:
    """The training rows as a map-style dataset, in row order."""
    if isinstance(split, Split):
        return TensorDataset(split.x_train, split.y_train)
    return split.train


def test_dataset(split: Any) -> Dataset:
    """The test rows as a map-style dataset, in column order."""
    if isinstance(split, Split):
        return TensorDataset(split.x_test, split.y_test)
    return split.test


def collate_fn(split: Any) -> Optional[Callable]:
    """The split's ``collate_fn`` (None: PyTorch's default stacking)."""
    make = getattr(split, "collate_fn", None)
    if make is None:
        return None
    if isinstance(split, DatasetSplit):
        return split.collate
    return make()


def row_loader(split: Any, start: int, stop: int, batch_size: int) -> DataLoader:
    """An unshuffled loader over training rows ``[start, stop)``, batched like the full one."""
    if isinstance(split, Split):
        data = TensorDataset(split.x_train[start:stop], split.y_train[start:stop])
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    rows = Subset(train_dataset(split), range(start, stop))
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_fn(split))


def sample_ndim(split: Any) -> int:
    """Dimensions of one sample's main input (1 for feature vectors and token ids, 3 for images)."""
    if isinstance(split, Split):
        return split.x_train.dim() - 1
    return int(torch.as_tensor(first_input(train_dataset(split)[0])).dim())


def train_fingerprint(split: Any) -> str:
    """SHA-256 identifying the training rows (keys the feature cache)."""
    if isinstance(split, Split):
        from dattri_cli.feature_cache import train_fingerprint as tensors_fingerprint  # noqa: PLC0415

        return tensors_fingerprint(split.x_train, split.y_train, split.train_indices)
    return hashlib.sha256(("train rows of " + split.fingerprint()).encode()).hexdigest()


def targets_shape(split: Any) -> Optional[tuple]:
    """Shape of one training target (``()`` for a scalar), or None when the rows have no labels."""
    if isinstance(split, Split):
        return tuple(split.y_train.shape[1:])
    sample = train_dataset(split)[0]
    if isinstance(sample, dict):
        label = sample.get(LABEL_KEY)
    elif isinstance(sample, (tuple, list)) and len(sample) > 1:
        label = sample[-1]
    else:
        label = None
    return None if label is None else tuple(torch.as_tensor(label).shape)


def num_features(split: Any) -> int:
    """Number of values of one sample's main input (filled into ``in_features``)."""
    value = getattr(split, "num_features", None)
    if isinstance(value, int):
        return value
    return int(torch.as_tensor(first_input(train_dataset(split)[0])).numel())
