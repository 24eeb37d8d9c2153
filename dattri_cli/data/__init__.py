"""Datasets: built-in (digits, synthetic) and bring-your-own files.

Every builder returns a :class:`Split` with fixed, seeded train/test positions.
Nothing here downloads: digits ships with scikit-learn, synthetic data is
generated, and user data comes from local files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dattri_cli.errors import DataError
from dattri_cli.hashing import data_fingerprint

log = logging.getLogger("dattri_cli")


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
        tensors = (
            self.x_train,
            self.y_train,
            self.x_test,
            self.y_test,
            self.train_indices,
            self.test_indices,
        )
        return data_fingerprint(tensors)

    def loaders(self, train_batch_size: int, test_batch_size: int) -> Tuple[DataLoader, DataLoader]:
        """Unshuffled loaders over train and test."""
        train = DataLoader(
            TensorDataset(self.x_train, self.y_train), batch_size=train_batch_size, shuffle=False
        )
        test = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=test_batch_size, shuffle=False)
        return train, test


def split_positions(
    name: str,
    total: int,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
) -> Tuple[Tensor, Tensor]:
    """Seeded train and test positions among ``total`` samples (the rules every dataset shares).

    ``n_train`` / ``n_test`` left ``None`` default to a 80/20 split of everything (or
    the rest, when one is given); the positions are the first ``n_train`` and the next
    ``n_test`` entries of ``torch.randperm(total)`` seeded by ``split_seed``, so the
    same seed picks the same samples whatever the dataset's storage.
    """
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
    return order[:n_train], order[n_train : n_train + n_test]


def split_dataset(
    name: str,
    x: Tensor,
    y: Tensor,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
) -> Split:
    """Seeded permutation of ``(x, y)``: the first ``n_train`` train, the next ``n_test`` test."""
    train_idx, test_idx = split_positions(name, int(x.shape[0]), n_train, n_test, split_seed)
    return Split(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], train_idx, test_idx)


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


def _first(mask: Tensor) -> int:
    """Position of the first True in a 1-D mask."""
    return int(mask.nonzero()[0, 0])


def check_xy(where: str, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Refuse inputs and labels no model can be trained on; return ``(x float32, y int64)``.

    ``x`` needs a sample dimension and features, ``y`` one finite, whole, non-negative
    label per sample. Each refusal names the first offending row.
    """
    if x.dim() < 2:
        msg = (
            f"{where}: x has shape {tuple(x.shape)}; it must be (samples, features...) with one row "
            "per sample (reshape 1-D data to (N, 1))"
        )
        raise DataError(msg)
    if y.dim() != 1:
        msg = (
            f"{where}: y has shape {tuple(y.shape)}; labels must be 1-D, one integer class per sample "
            "(not one-hot or a column: use y.argmax(1) or y.reshape(-1))"
        )
        raise DataError(msg)
    if x.shape[0] != y.shape[0]:
        msg = f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}"
        raise DataError(msg)
    if x.dtype == torch.bool or y.dtype == torch.bool or x.is_complex() or y.is_complex():
        msg = f"{where}: x must hold real numbers and y integer labels (got {x.dtype} and {y.dtype})"
        raise DataError(msg)
    x = x.float()
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bool(bad.any()):
        msg = f"{where} contains NaN or Inf inputs (first at row {_first(bad)}); clean the data file first"
        raise DataError(msg)
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            msg = (
                f"{where} contains NaN or Inf labels (first at row {_first(~torch.isfinite(y))}); "
                "every sample needs a class"
            )
            raise DataError(msg)
        fractional = y != torch.round(y)
        if bool(fractional.any()):
            row = _first(fractional)
            msg = (
                f"{where}: labels must be whole class numbers, but y[{row}] = {float(y[row]):g}; "
                "store class indices 0..K-1, not scores or probabilities"
            )
            raise DataError(msg)
    y = y.long()
    if y.numel() and bool((y < 0).any()):
        row = _first(y < 0)
        msg = f"{where}: labels must be class indices 0..K-1, but y[{row}] = {int(y[row])}; map your classes to 0..K-1"
        raise DataError(msg)
    return x, y


def _read_tensors(path: Path, label_column: str) -> Tuple[Tensor, Tensor]:
    """``x`` and ``y`` from .safetensors / .npz / .pt (keys x, y) or .csv (a label column), checked."""
    return _xy(path, _raw_arrays(path, label_column))


def _xy(path: Path, arrays: dict) -> Tuple[Tensor, Tensor]:
    """The checked ``x`` / ``y`` tensors of a file's arrays (classification's reading)."""
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        msg = f"{path} lacks {missing}; it must hold 'x' (inputs) and 'y' (integer labels), found {sorted(arrays)}"
        raise DataError(msg)
    try:
        x, y = torch.as_tensor(arrays["x"]), torch.as_tensor(arrays["y"])
    except (TypeError, ValueError, RuntimeError) as exc:
        msg = f"{path}: 'x' and 'y' must be numeric arrays ({exc})"
        raise DataError(msg) from exc
    return check_xy(str(path), x, y)


def _read_arrays(path: Path, suffix: str) -> dict:
    """Every array of a .safetensors or .npz file, or one line saying why it cannot be read."""
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            return load_file(str(path))
        import numpy as np  # noqa: PLC0415

        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any parse failure means an empty, truncated or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        empty = (
            "the file is empty"
            if path.stat().st_size == 0
            else f"empty, truncated or not a {suffix} file: {reason}"
        )
        msg = f"cannot read data file {path} ({empty}); write it again"
        raise DataError(msg) from exc


def _read_csv(path: Path, label_column: str) -> Tuple[Tensor, Tensor]:
    import csv  # noqa: PLC0415

    values, blank = [], 0
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
        for row in reader:
            if not row or all(not v.strip() for v in row):
                blank += 1
                continue
            if len(row) != len(header):
                msg = (
                    f"{path} line {reader.line_num} has {len(row)} fields but the header has "
                    f"{len(header)}; every row needs one value per column"
                )
                raise DataError(msg)
            try:
                values.append([float(v) for v in row])
            except ValueError as exc:
                msg = f"{path} line {reader.line_num} holds a non-numeric value ({exc}); every column must be numeric"
                raise DataError(msg) from exc
    if blank:
        log.info("%s: skipped %d blank line(s)", path, blank)
    if not values:
        msg = f"{path} has a header but no rows"
        raise DataError(msg)
    table = torch.tensor(values, dtype=torch.float64)
    keep = [i for i in range(table.shape[1]) if i != label_at]
    return table[:, keep].float(), table[:, label_at]


def _from_arrays(
    path: Path,
    raw: dict,
    test_path: Optional[Union[str, Path]],
    label_column: str,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
    task: str,
) -> Any:
    """``from_files`` for named inputs or non-class targets: tensors kept as stored (see there)."""
    parts = [_checked_arrays(str(path), raw, task)]
    if test_path is not None:
        test_path = Path(test_path).expanduser()
        parts.append(_checked_arrays(str(test_path), _raw_arrays(test_path, label_column), task))
    if set(parts[0][0]) == {"x"}:  # one input array: (x, y) tensors, as a Split
        xs = [inputs["x"] for inputs, _ in parts]
        ys = [inputs["x"] if y is None else y for inputs, y in parts]  # language modelling: labels = ids
        if len(parts) == 1:
            return split_dataset(path.name, xs[0], ys[0], n_train, n_test, split_seed)
        generator = torch.Generator().manual_seed(split_seed)
        picks = []
        for x, count in ((xs[0], n_train), (xs[1], n_test)):
            count = x.shape[0] if count is None else count
            if count < 1 or count > x.shape[0]:
                msg = f"n_train / n_test = {count} does not fit {x.shape[0]} rows"
                raise DataError(msg)
            picks.append(torch.randperm(x.shape[0], generator=generator)[:count])
        tr, te = picks
        return Split(path.name, xs[0][tr], ys[0][tr], xs[1][te], ys[1][te], tr, te)
    datasets = []
    for inputs, y in parts:
        tensors = dict(inputs)
        if y is not None:
            tensors["labels"] = y
        datasets.append(DictTensorDataset(tensors))
    return dataset_split(
        path.name,
        datasets[0],
        n_train,
        n_test,
        split_seed,
        test_dataset=datasets[1] if len(datasets) > 1 else None,
    )


def _check_classes(where: str, y_train: Tensor, y_test: Tensor) -> None:
    """At least two training classes, and no test class the training labels never reach."""
    classes = torch.unique(y_train)
    if classes.numel() < 2:
        only = int(classes[0]) if classes.numel() else None
        msg = (
            f"{where}: the training labels hold only one class ({only}); attribution needs at least "
            "two classes (check dataset.label_column, or use more training rows)"
        )
        raise DataError(msg)
    top = int(classes.max())
    if y_test.numel() and int(y_test.max()) > top:
        row = _first(y_test > top)
        msg = (
            f"{where}: test label y[{row}] = {int(y_test[row])} but the training labels only go up to "
            f"{top}; the model cannot predict a class it never saw"
        )
        raise DataError(msg)


#: tasks whose targets are not class indices: float and multi-dimensional targets are kept as stored
KEEP_TARGET_TASKS = ("regression", "causal_lm", "model_loss", "custom")
#: tasks whose integer inputs are token ids (kept integer)
TOKEN_TASKS = ("causal_lm", "model_loss")
#: names of the label array in a data file
LABEL_NAMES = ("y", "labels")


def _raw_arrays(path: Path, label_column: str) -> dict:
    """Every array of a data file by name (a csv: ``x`` and ``y``), unchecked; one line when unreadable."""
    if not path.is_file():
        msg = f"data file not found: {path}"
        raise DataError(msg)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, y = _read_csv(path, label_column)
        return {"x": x, "y": y}
    if suffix in {".safetensors", ".npz"}:
        return _read_arrays(path, suffix)
    if suffix in {".pt", ".pth"}:
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the user's file is unreadable
            from dattri_cli.errors import torch_load_refusal  # noqa: PLC0415

            raise DataError(torch_load_refusal(path, exc, "data file")) from exc
        if not isinstance(arrays, dict):
            msg = f"{path} must hold a dict with tensors 'x' and 'y'"
            raise DataError(msg)
        return arrays
    msg = f"unsupported data file type {suffix!r} for {path}; use .safetensors, .npz, .pt or .csv"
    raise DataError(msg)


def _checked_arrays(where: str, arrays: dict, task: str) -> Tuple[dict, Optional[Tensor]]:
    """Inputs (by name) and targets of a file read for ``task``: dtypes and shapes kept as the task needs."""
    label_name = next((k for k in LABEL_NAMES if k in arrays), None)
    inputs = {k: torch.as_tensor(v) for k, v in arrays.items() if k != label_name}
    y = None if label_name is None else torch.as_tensor(arrays[label_name])
    if not inputs:
        msg = f"{where} holds no input arrays (found {sorted(arrays)}); store 'x' or named inputs such as 'input_ids'"
        raise DataError(msg)
    rows = {k: int(v.shape[0]) if v.dim() else 0 for k, v in inputs.items()}
    if y is not None:
        rows[label_name] = int(y.shape[0]) if y.dim() else 0
    if len(set(rows.values())) != 1 or 0 in rows.values():
        msg = f"{where}: every array needs one row per sample, got rows {rows}"
        raise DataError(msg)
    named = set(inputs) != {"x"}
    for name, value in inputs.items():
        if value.dtype == torch.bool or value.is_complex():
            msg = f"{where}: input {name!r} must hold real numbers, got {value.dtype}"
            raise DataError(msg)
        if value.is_floating_point():
            bad = ~torch.isfinite(value).reshape(value.shape[0], -1).all(dim=1)
            if bool(bad.any()):
                msg = f"{where} contains NaN or Inf inputs in {name!r} (first at row {_first(bad)})"
                raise DataError(msg)
            inputs[name] = value.float()
        elif not (named or task in TOKEN_TASKS):
            inputs[name] = value.float()  # integer pixels or counts: features, as always
        else:
            inputs[name] = value.long()  # token ids reach the embedding as integers
    if y is None:
        if task != "causal_lm":
            msg = f"{where} has no labels ('y' or 'labels'); only task=causal_lm reads inputs alone"
            raise DataError(msg)
    elif y.is_floating_point() and not bool(torch.isfinite(y).all()):
        bad = ~torch.isfinite(y.reshape(y.shape[0], -1)).all(1)
        msg = f"{where} contains NaN or Inf targets (first at row {_first(bad)})"
        raise DataError(msg)
    elif y.dtype == torch.bool or y.is_complex():
        msg = f"{where}: targets must be numbers, got {y.dtype}"
        raise DataError(msg)
    elif not y.is_floating_point():
        y = y.long()
    else:
        y = y.float()
    return inputs, y


def from_files(
    path: Union[str, Path],
    test_path: Optional[Union[str, Path]] = None,
    label_column: str = "label",
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    split_seed: int = 0,
    task: Optional[str] = None,
) -> Any:
    """Your own data: one file split by seed, or separate train and test files.

    ``task`` (filled from ``task.name``) decides what the arrays may hold: for
    classification, ``x`` (float features) and ``y`` (integer classes) as always; for
    ``regression`` / ``causal_lm`` / ``model_loss`` / ``custom``, float and ``(N, L)``
    targets keep their dtype and shape, and for ``causal_lm`` / ``model_loss`` integer
    inputs stay integers (token ids). A ``.npz`` / ``.safetensors`` file holding named
    input arrays other than ``x`` (``input_ids``, ``attention_mask`` ...) gives dict
    batches of those names plus ``labels`` (from ``y`` or ``labels``), integers kept.
    """
    task = task or "classification"
    path = Path(path).expanduser()
    raw = _raw_arrays(path, label_column)
    if raw and (set(raw) - {"x", "y"} or task in KEEP_TARGET_TASKS):
        return _from_arrays(path, raw, test_path, label_column, n_train, n_test, split_seed, task)
    x, y = _xy(path, raw)
    if test_path is None:
        split = split_dataset(path.name, x, y, n_train, n_test, split_seed)
        unused = x.shape[0] - split.x_train.shape[0] - split.x_test.shape[0]
        log.info(
            "%s: %d rows -> %d train + %d test (split_seed %d)%s",
            path,
            x.shape[0],
            split.x_train.shape[0],
            split.x_test.shape[0],
            split_seed,
            f"; {unused} rows unused (dataset.n_train / dataset.n_test)" if unused else "",
        )
        _check_classes(str(path), split.y_train, split.y_test)
        return split
    test_path = Path(test_path).expanduser()
    x_test, y_test = _read_tensors(test_path, label_column)
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
        msg = (
            f"{test_path} has samples of shape {tuple(x_test.shape[1:])} but {path} has "
            f"{tuple(x.shape[1:])}; train and test files need the same features"
        )
        raise DataError(msg)
    n_tr = x.shape[0] if n_train is None else n_train
    n_te = x_test.shape[0] if n_test is None else n_test
    if n_tr > x.shape[0] or n_te > x_test.shape[0] or n_tr < 1 or n_te < 1:
        msg = (
            f"n_train={n_tr} / n_test={n_te} do not fit the files "
            f"({x.shape[0]} train rows, {x_test.shape[0]} test rows)"
        )
        raise DataError(msg)
    log.info(
        "%s: first %d of %d rows train; %s: first %d of %d rows test",
        path,
        n_tr,
        x.shape[0],
        test_path,
        n_te,
        x_test.shape[0],
    )
    _check_classes(f"{path} / {test_path}", y[:n_tr], y_test[:n_te])
    train_idx, test_idx = torch.arange(n_tr), torch.arange(n_te)
    return Split(path.name, x[:n_tr], y[:n_tr], x_test[:n_te], y_test[:n_te], train_idx, test_idx)


#: label entry of dictionary samples
LABEL_KEY = "labels"
#: input of dictionary samples that decides one sample's dimensions
MAIN_INPUT_KEY = "input_ids"


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
