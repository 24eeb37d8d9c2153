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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dattri_cli.data import Split
from dattri_cli.errors import DataError

#: label entry of dictionary samples
LABEL_KEY = "labels"
#: input of dictionary samples that decides one sample's dimensions
MAIN_INPUT_KEY = "input_ids"


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


def first_input(sample: Any) -> Tensor:
    """The main input of one sample: ``input_ids`` (or the first tensor) of a dict, the first of a tuple."""
    if isinstance(sample, dict):
        if isinstance(sample.get(MAIN_INPUT_KEY), Tensor):
            return sample[MAIN_INPUT_KEY]
        for key, value in sample.items():
            if key != LABEL_KEY and isinstance(value, Tensor):
                return value
    elif isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], Tensor):
        return sample[0]
    elif isinstance(sample, Tensor):
        return sample
    msg = (
        f"a dataset sample must be a tensor, an (inputs, label) tuple or a dict of tensors, got "
        f"{type(sample).__name__}"
    )
    raise DataError(msg)


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


# -- any torch Dataset ----------------------------------------------------------------------------


class DictTensorDataset(Dataset):
    """Rows of named tensors (equal first dimensions) as dict samples: ``{name: tensor[i]}``."""

    def __init__(self, tensors: Dict[str, Tensor]) -> None:
        """Keep the tensors; all must have the same number of rows."""
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            msg = f"named arrays must have the same number of rows, got {sizes}"
            raise DataError(msg)
        self.tensors = tensors

    def __len__(self) -> int:
        """Number of rows."""
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        """Row ``index`` of every tensor."""
        return {k: v[index] for k, v in self.tensors.items()}


def _label_of(sample: Any) -> Any:
    if isinstance(sample, dict):
        return sample.get(LABEL_KEY)
    if isinstance(sample, (tuple, list)) and len(sample) > 1:
        return sample[-1]
    return None


@dataclass
class DatasetSplit:
    """Train and test rows of any map-style ``torch.utils.data.Dataset`` (one, split by seed, or two).

    ``collate`` batches its samples (None: PyTorch's default). Samples are ``(inputs...,
    label)`` tuples, dicts (``labels`` the target, the rest passed to the model by name),
    or bare tensors (inputs only).
    """

    name: str
    train: Dataset
    test: Dataset
    train_indices: Tensor
    test_indices: Tensor
    collate: Optional[Callable] = None
    fingerprint_text: str = ""

    def collate_fn(self) -> Optional[Callable]:
        """The batching function."""
        return self.collate

    @property
    def num_features(self) -> int:
        """Number of values of one sample's main input."""
        return int(torch.as_tensor(first_input(self.train[0])).numel())

    @property
    def num_classes(self) -> Optional[int]:
        """Largest integer scalar label + 1 over train and test (None when labels are not class indices)."""
        source = getattr(self.train, "dataset", self.train)
        for attr in ("num_classes",):
            value = getattr(source, attr, None)
            if isinstance(value, int):
                return value
        classes = getattr(source, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return len(classes)
        top = -1
        for rows in (self.train, self.test):
            for i in range(len(rows)):
                label = _label_of(rows[i])
                if label is None:
                    return None
                label = torch.as_tensor(label)
                if label.dim() != 0 or label.is_floating_point():
                    return None
                top = max(top, int(label))
        return top + 1 if top >= 0 else None

    def loaders(self, train_batch_size: int, test_batch_size: int):  # noqa: ANN201
        """Unshuffled loaders over train and test."""
        return (
            DataLoader(self.train, batch_size=train_batch_size, shuffle=False, collate_fn=self.collate),
            DataLoader(self.test, batch_size=test_batch_size, shuffle=False, collate_fn=self.collate),
        )

    def fingerprint(self) -> str:
        """SHA-256 of every sample's tensors (read once) and the positions."""
        digest = hashlib.sha256(self.fingerprint_text.encode())
        for rows in (self.train, self.test):
            for i in range(len(rows)):
                _feed(digest, rows[i])
        for t in (self.train_indices, self.test_indices):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode() + b"\0")
            _feed(digest, value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            _feed(digest, item)
    else:
        tensor = torch.as_tensor(value)
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def dataset_split(
    name: str,
    dataset: Dataset,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
    collate: Optional[Callable] = None,
    test_dataset: Optional[Dataset] = None,
) -> DatasetSplit:
    """A seeded split of ``dataset`` (the rules of every dataset here), or ``dataset`` + ``test_dataset``."""
    from dattri_cli.data import split_positions  # noqa: PLC0415

    try:
        total = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        msg = f"dataset {name} has no len(); dattri needs a map-style torch.utils.data.Dataset"
        raise DataError(msg) from exc
    if test_dataset is None:
        train_idx, test_idx = split_positions(name, total, n_train, n_test, split_seed)
        test_source = dataset
    else:
        generator = torch.Generator().manual_seed(split_seed)
        picks = []
        for rows, count in ((dataset, n_train), (test_dataset, n_test)):
            size = len(rows)  # type: ignore[arg-type]
            count = size if count is None else count
            if count < 1 or count > size:
                msg = f"dataset {name}: cannot take {count} of {size} rows"
                raise DataError(msg)
            picks.append(torch.randperm(size, generator=generator)[:count])
        train_idx, test_idx = picks
        test_source = test_dataset
    return DatasetSplit(
        name,
        Subset(dataset, train_idx.tolist()),
        Subset(test_source, test_idx.tolist()),
        train_idx,
        test_idx,
        collate,
        name,
    )


def num_features(split: Any) -> int:
    """Number of values of one sample's main input (filled into ``in_features``)."""
    value = getattr(split, "num_features", None)
    if isinstance(value, int):
        return value
    return int(torch.as_tensor(first_input(train_dataset(split)[0])).numel())
