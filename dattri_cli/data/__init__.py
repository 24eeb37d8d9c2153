"""Datasets: built-in (digits, synthetic) and bring-your-own files.

Every builder returns a :class:`Split` with fixed, seeded train/test positions.
Nothing here downloads: digits ships with scikit-learn, synthetic data is
generated, and user data comes from local files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.errors import DataError


@dataclass
class Split:
    """Train and test tensors, with their positions in the source dataset."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    train_indices: Tensor
    test_indices: Tensor

    @property
    def num_features(self) -> int:
        """Number of input features per sample (flattened)."""
        return int(self.x_train[0].numel())

    @property
    def num_classes(self) -> int:
        """Number of classes (largest label + 1 over train and test)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def fingerprint(self) -> str:
        """SHA-256 of the tensors: identifies the exact data a checkpoint was trained on."""
        digest = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test, self.train_indices, self.test_indices):
            digest.update(t.contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def loaders(self, train_batch_size: int, test_batch_size: int) -> Tuple[DataLoader, DataLoader]:
        """Unshuffled loaders over train and test."""
        train = DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=train_batch_size, shuffle=False)
        test = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=test_batch_size, shuffle=False)
        return train, test


def split_dataset(
    name: str,
    x: Tensor,
    y: Tensor,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
) -> Split:
    """Seeded permutation of ``(x, y)``: the first ``n_train`` train, the next ``n_test`` test."""
    total = int(x.shape[0])
    if total == 0:
        msg = f"dataset {name} is empty"
        raise DataError(msg)
    if n_train is None and n_test is None:
        n_test = max(1, total // 5)
    if n_train is None:
        n_train = total - n_test
    if n_test is None:
        n_test = total - n_train
    if n_train < 1 or n_test < 1:
        msg = f"dataset.n_train and dataset.n_test must be at least 1 (got {n_train} and {n_test})"
        raise DataError(msg)
    if n_train + n_test > total:
        msg = (
            f"dataset {name} has {total} samples, fewer than n_train + n_test = "
            f"{n_train} + {n_test}; lower dataset.n_train or dataset.n_test"
        )
        raise DataError(msg)
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(total, generator=generator)
    train_idx, test_idx = order[:n_train], order[n_train : n_train + n_test]
    return Split(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], train_idx, test_idx)


def _check_finite(name: str, x: Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        msg = f"dataset {name} contains NaN or Inf inputs; clean the data file first"
        raise DataError(msg)


def digits(n_train: Optional[int] = 1000, n_test: Optional[int] = 200, split_seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - heavy import, only when used

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return split_dataset("digits", x, y, n_train, n_test, split_seed)


def synthetic(
    n_samples: int = 2000,
    n_features: int = 20,
    n_classes: int = 3,
    class_sep: float = 1.5,
    seed: int = 0,
    n_train: Optional[int] = 1000,
    n_test: Optional[int] = 200,
    split_seed: int = 0,
) -> Split:
    """Gaussian blobs: each class a unit-variance cloud around a random centre."""
    if n_samples < 1 or n_features < 1 or n_classes < 2:
        msg = "synthetic data needs n_samples >= 1, n_features >= 1 and n_classes >= 2"
        raise DataError(msg)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, n_features, generator=generator) * class_sep
    y = torch.arange(n_samples) % n_classes
    x = centres[y] + torch.randn(n_samples, n_features, generator=generator)
    return split_dataset("synthetic", x, y, n_train, n_test, split_seed)


def _read_tensors(path: Path, label_column: str) -> Tuple[Tensor, Tensor]:
    """``x`` and ``y`` from .safetensors / .npz / .pt (keys x, y) or .csv (a label column)."""
    if not path.is_file():
        msg = f"data file not found: {path}"
        raise DataError(msg)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, label_column)
    if suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        arrays = load_file(str(path))
    elif suffix == ".npz":
        import numpy as np  # noqa: PLC0415

        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(npz[k]) for k in npz.files}
    elif suffix in {".pt", ".pth"}:
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the user's file is unreadable
            msg = f"could not read {path} as a weights-only torch file: {exc}"
            raise DataError(msg) from exc
        if not isinstance(arrays, dict):
            msg = f"{path} must hold a dict with tensors 'x' and 'y'"
            raise DataError(msg)
    else:
        msg = f"unsupported data file type {suffix!r} for {path}; use .safetensors, .npz, .pt or .csv"
        raise DataError(msg)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        msg = f"{path} lacks {missing}; it must hold 'x' (inputs) and 'y' (integer labels), found {sorted(arrays)}"
        raise DataError(msg)
    x, y = torch.as_tensor(arrays["x"]), torch.as_tensor(arrays["y"])
    if x.shape[0] != y.shape[0]:
        msg = f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]}"
        raise DataError(msg)
    return x.float(), y.long().reshape(-1)


def _read_csv(path: Path, label_column: str) -> Tuple[Tensor, Tensor]:
    import csv  # noqa: PLC0415

    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            msg = f"{path} is empty"
            raise DataError(msg)
        if label_column not in header:
            msg = f"{path} has no label column {label_column!r} (columns: {header}); set dataset.label_column"
            raise DataError(msg)
        label_at = header.index(label_column)
        rows = list(reader)
    try:
        values = [[float(v) for v in row] for row in rows if row]
    except ValueError as exc:
        msg = f"{path} holds a non-numeric value: {exc}"
        raise DataError(msg) from exc
    table = torch.tensor(values, dtype=torch.float32)
    if table.numel() == 0:
        msg = f"{path} has a header but no rows"
        raise DataError(msg)
    keep = [i for i in range(table.shape[1]) if i != label_at]
    return table[:, keep], table[:, label_at].long()


def from_files(
    path: Union[str, Path],
    test_path: Optional[Union[str, Path]] = None,
    label_column: str = "label",
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    split_seed: int = 0,
) -> Split:
    """Your own data: one file split by seed, or separate train and test files."""
    path = Path(path).expanduser()
    x, y = _read_tensors(path, label_column)
    _check_finite(str(path), x)
    if test_path is None:
        return split_dataset(path.name, x, y, n_train, n_test, split_seed)
    x_test, y_test = _read_tensors(Path(test_path).expanduser(), label_column)
    _check_finite(str(test_path), x_test)
    n_tr = x.shape[0] if n_train is None else n_train
    n_te = x_test.shape[0] if n_test is None else n_test
    if n_tr > x.shape[0] or n_te > x_test.shape[0] or n_tr < 1 or n_te < 1:
        msg = (
            f"n_train={n_tr} / n_test={n_te} do not fit the files "
            f"({x.shape[0]} train rows, {x_test.shape[0]} test rows)"
        )
        raise DataError(msg)
    train_idx, test_idx = torch.arange(n_tr), torch.arange(n_te)
    return Split(path.name, x[:n_tr], y[:n_tr], x_test[:n_te], y_test[:n_te], train_idx, test_idx)
