"""Tables from local files read with Hugging Face ``datasets``: text (tokenised) or numeric columns.

Why: text classifiers and language models are trained on tables (csv, json lines,
parquet, or a folder written by ``Dataset.save_to_disk``) and tokenised by a
tokenizer the user already has on disk. This module turns such a table into the
batches attribution needs, without downloading anything:

* ``text_column`` + ``tokenizer`` (a local directory or ``tokenizer.json``) +
  ``max_length``: each row becomes ``input_ids`` (truncated), and
  :func:`pad_collate` pads a batch into the dictionary ``input_ids``,
  ``attention_mask``, ``labels`` that Hugging Face models take. Without a
  ``label_column`` (language modelling) ``labels`` are the token ids with ``-100``
  at padding, Hugging Face's convention.
* numeric ``input_columns``: the rows become an in-memory
  :class:`~dattri_cli.data.Split` of ``(x, y)`` tensors, like ``dataset=file``, with
  float labels kept float (regression).

Labels: integer columns stay integers, float columns floats, and text labels
become class indices in sorted order of their names. The train/test split follows
the rules of every dataset here (:func:`dattri_cli.data.split_positions`), or a
separate ``test_path`` is used whole. ``datasets`` is imported only here, with a
one-line error naming the extra when it is missing.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dattri_cli.data import Split, split_positions
from dattri_cli.errors import DataError

log = logging.getLogger("dattri_cli")

EXTRA_HINT = "pip install 'dattri-cli[text]'"
#: file endings read as tables, and the ``datasets.Dataset`` reader of each
TABLE_READERS = {
    ".csv": "from_csv",
    ".json": "from_json",
    ".jsonl": "from_json",
    ".parquet": "from_parquet",
    ".txt": "from_text",  # one row per line, column "text" (language modelling)
}
#: label value for positions no loss is taken at (padding)
IGNORE_INDEX = -100


def _import(module: str) -> Any:
    """An optional module of the ``text`` extra, or one line saying how to install it."""
    try:
        return __import__(module)
    except ImportError as exc:
        msg = f"reading text tables needs the {module} package: {EXTRA_HINT}"
        raise DataError(msg) from exc


def read_table(path: Union[str, Path], split: str = "train") -> Any:
    """A ``datasets.Dataset`` from a local csv / json / jsonl / parquet file or ``save_to_disk`` folder.

    Nothing is cached on disk: files are read into memory through a temporary cache
    folder that is removed afterwards. A ``DatasetDict`` folder gives its ``split``.
    """
    datasets = _import("datasets")
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            table = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - not a save_to_disk folder
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = f"cannot read {path} as a folder written by Dataset.save_to_disk ({reason})"
            raise DataError(msg) from exc
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                msg = f"{path} holds splits {sorted(table)}, not {split!r}; set dataset.split"
                raise DataError(msg)
            table = table[split]
        return table
    if not path.is_file():
        msg = f"data file not found: {path}"
        raise DataError(msg)
    reader = TABLE_READERS.get(path.suffix.lower())
    if reader is None:
        msg = (
            f"unsupported table file type {path.suffix!r} for {path}; use {', '.join(TABLE_READERS)} "
            "or a save_to_disk folder"
        )
        raise DataError(msg)
    with tempfile.TemporaryDirectory(prefix="dattri-table-") as cache:
        try:
            return getattr(datasets.Dataset, reader)(str(path), keep_in_memory=True, cache_dir=cache)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "corresponds to no data" in reason:  # datasets' words for a header without rows
                msg = f"table {path} has no rows"
                raise DataError(msg) from exc
            msg = f"cannot read table {path} ({reason})"
            raise DataError(msg) from exc


@dataclass
class Tokenizer:
    """A local tokenizer reduced to what batching needs: ``encode(texts) -> ids`` and the padding id."""

    encode: Callable[[List[str]], List[List[int]]]
    pad_token_id: int
    source: str


def load_tokenizer(path: Union[str, Path], pad_token_id: Optional[int] = None) -> Tokenizer:
    """A tokenizer from ``tokenizer.json`` (or a folder holding one) via ``tokenizers``, else via transformers.

    The padding id is ``pad_token_id`` when given, else the tokenizer's own pad
    token (``[PAD]`` / ``<pad>`` / its padding setting); a tokenizer without one is
    refused, since padding with a real token would be silently wrong.
    """
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        tokenizers = _import("tokenizers")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - malformed tokenizer file
            msg = (
                f"cannot read tokenizer {file} ("
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
            )
            raise DataError(msg) from exc
        if pad_token_id is None:
            padding = tok.padding or {}
            pad_token_id = padding.get("pad_id") if padding.get("pad_token") else None
            for name in ("[PAD]", "<pad>", "<|pad|>"):
                if pad_token_id is None:
                    pad_token_id = tok.token_to_id(name)
        if pad_token_id is None:
            msg = f"tokenizer {file} has no padding token ([PAD] or <pad>); set dataset.pad_token_id"
            raise DataError(msg)
        return Tokenizer(lambda texts: [e.ids for e in tok.encode_batch(texts)], int(pad_token_id), str(file))
    if not path.is_dir():
        msg = f"tokenizer not found: {path} (a folder written by save_pretrained, or a tokenizer.json file)"
        raise DataError(msg)
    transformers = _import("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not a tokenizer folder
        msg = (
            f"cannot load a tokenizer from {path} ("
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
        )
        raise DataError(msg) from exc
    pad = pad_token_id if pad_token_id is not None else tok.pad_token_id
    if pad is None:
        msg = f"tokenizer {path} has no padding token; set dataset.pad_token_id"
        raise DataError(msg)
    return Tokenizer(lambda texts: tok(texts)["input_ids"], int(pad), str(path))


def pad_collate(
    pad_token_id: int, label_pad: int = IGNORE_INDEX
) -> Callable[[List[Dict[str, Tensor]]], Dict[str, Tensor]]:
    """A ``collate_fn`` padding ``input_ids`` on the right and adding ``attention_mask``.

    Scalar ``labels`` are stacked; sequence ``labels`` (language modelling) are
    padded with ``label_pad``. Token ids stay ``int64``.
    """

    def collate(items: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        length = max(int(item["input_ids"].numel()) for item in items)
        ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = int(item["input_ids"].numel())
            ids[row, :n] = item["input_ids"]
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            labels = [item["labels"] for item in items]
            if labels[0].dim() == 0:
                batch["labels"] = torch.stack(labels)
            else:
                padded = torch.full((len(items), length), label_pad, dtype=labels[0].dtype)
                for row, value in enumerate(labels):
                    padded[row, : value.numel()] = value
                batch["labels"] = padded
        return batch

    return collate


class TokenisedRows(Dataset):
    """Token id sequences with optional labels; ``__getitem__`` gives ``{"input_ids", "labels"}``."""

    def __init__(self, ids: List[Tensor], labels: Optional[Tensor]) -> None:
        """Keep the sequences (int64) and labels (one per sequence, or None: labels are the ids)."""
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.ids)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        """Row ``index``: its token ids, and its label (or the ids again, for language modelling)."""
        label = self.ids[index] if self.labels is None else self.labels[index]
        return {"input_ids": self.ids[index], "labels": label}


class Rows(Dataset):
    """The rows of ``base`` at ``indices``, in that order."""

    def __init__(self, base: TokenisedRows, indices: Tensor) -> None:
        """Keep the rows and positions."""
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        """Number of positions."""
        return int(self.indices.numel())

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        """Row ``indices[i]`` of the base rows."""
        return self.base[int(self.indices[i])]


@dataclass
class TextSplit:
    """Tokenised train and test rows, with positions in the source table(s), and how to batch them."""

    name: str
    train: Rows
    test: Rows
    train_indices: Tensor
    test_indices: Tensor
    pad_token_id: int
    classes: Optional[List[str]] = None
    max_length: int = 0
    label_kind: str = "none"
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def y_train(self) -> Optional[Tensor]:
        """Training labels (None for language modelling)."""
        labels = self.train.base.labels
        return None if labels is None else labels[self.train_indices]

    @property
    def y_test(self) -> Optional[Tensor]:
        """Test labels (None for language modelling)."""
        labels = self.test.base.labels
        return None if labels is None else labels[self.test_indices]

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes for integer labels (largest + 1, or the number of text label names)."""
        if self.classes is not None:
            return len(self.classes)
        if self.label_kind != "class":
            return None
        return int(max(self.y_train.max(), self.y_test.max())) + 1  # type: ignore[union-attr]

    def collate_fn(self) -> Callable[[List[Dict[str, Tensor]]], Dict[str, Tensor]]:
        """The padding ``collate_fn`` of these rows."""
        return pad_collate(self.pad_token_id)

    def loaders(self, train_batch_size: int, test_batch_size: int) -> Tuple[DataLoader, DataLoader]:
        """Unshuffled loaders yielding padded dictionary batches."""
        collate = self.collate_fn()
        return (
            DataLoader(self.train, batch_size=train_batch_size, shuffle=False, collate_fn=collate),
            DataLoader(self.test, batch_size=test_batch_size, shuffle=False, collate_fn=collate),
        )

    def fingerprint(self) -> str:
        """SHA-256 of the token ids, labels, padding id and chosen positions."""
        digest = hashlib.sha256()
        digest.update(repr((self.pad_token_id, self.classes, self.label_kind)).encode())
        bases = [self.train.base] if self.test.base is self.train.base else [self.train.base, self.test.base]
        for base in bases:
            for ids in base.ids:
                digest.update(ids.numpy().tobytes() + b"\0")
            if base.labels is not None:
                digest.update(base.labels.contiguous().numpy().tobytes())
        for t in (self.train_indices, self.test_indices):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()


def _column(table: Any, name: str, where: str, what: str) -> List[Any]:
    if name not in table.column_names:
        msg = f"{where} has no column {name!r} (columns: {table.column_names}); set dataset.{what}"
        raise DataError(msg)
    values = table[name]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        msg = f"{where}: column {name!r} is empty at row {missing[0]}; every row needs a value"
        raise DataError(msg)
    return list(values)


def _labels(
    values: List[Any], where: str, label_kind: str, classes: Optional[List[str]]
) -> Tuple[Tensor, str, Optional[List[str]]]:
    """Labels as a tensor: class indices (ints, or text names in sorted order) or floats."""
    if label_kind not in {"auto", "class", "float"}:
        msg = f"dataset.label_kind must be auto, class or float, got {label_kind!r}"
        raise DataError(msg)
    if any(isinstance(v, str) for v in values):
        if label_kind == "float":
            msg = f"{where}: labels are text, not numbers; use label_kind=class"
            raise DataError(msg)
        names = classes if classes is not None else sorted({str(v) for v in values})
        unknown = sorted({str(v) for v in values} - set(names))
        if unknown:
            msg = f"{where}: labels {unknown} do not occur in the training table (classes: {names})"
            raise DataError(msg)
        return torch.tensor([names.index(str(v)) for v in values], dtype=torch.long), "class", names
    try:
        tensor = torch.tensor(values)
    except (TypeError, ValueError) as exc:
        msg = f"{where}: labels must be numbers or text ({exc})"
        raise DataError(msg) from exc
    if label_kind == "float" or (label_kind == "auto" and tensor.is_floating_point()):
        return tensor.float(), "float", None
    if tensor.is_floating_point() and bool((tensor != torch.round(tensor)).any()):
        msg = f"{where}: label_kind=class needs whole-number labels; use label_kind=float for regression targets"
        raise DataError(msg)
    tensor = tensor.long()
    if bool((tensor < 0).any()):
        msg = f"{where}: class labels must be 0..K-1, found {int(tensor.min())}"
        raise DataError(msg)
    return tensor, "class", None


def _pick(total: int, count: Optional[int], seed: int, where: str) -> Tensor:
    count = total if count is None else count
    if count < 1 or count > total:
        msg = f"{where} has {total} rows; cannot take {count}"
        raise DataError(msg)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


def hf_table(
    path: Union[str, Path],
    test_path: Optional[Union[str, Path]] = None,
    text_column: Optional[str] = None,
    input_columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = "label",
    tokenizer: Optional[Union[str, Path]] = None,
    max_length: int = 128,
    pad_token_id: Optional[int] = None,
    label_kind: str = "auto",
    split: str = "train",
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    split_seed: int = 0,
) -> Union[TextSplit, Split]:
    """A local table as attribution data: :class:`TextSplit` for ``text_column``, :class:`Split` for ``input_columns``.

    ``label_column=None`` (text only) is language modelling: the labels are the
    token ids. With ``test_path`` the two tables are used as they are, ``n_train`` /
    ``n_test`` rows of each picked by a ``split_seed``-seeded permutation (all when None).
    """
    if (text_column is None) == (input_columns is None):
        msg = "give dataset.text_column (text) or dataset.input_columns (numeric features), exactly one"
        raise DataError(msg)
    if not isinstance(max_length, int) or max_length < 1:
        msg = f"dataset.max_length must be a positive integer, got {max_length!r}"
        raise DataError(msg)
    tables = [(str(path), read_table(path, split))]
    if test_path is not None:
        tables.append((str(test_path), read_table(test_path, split)))
    for where, table in tables:
        if table.num_rows == 0:
            msg = f"table {where} has no rows"
            raise DataError(msg)
    if input_columns is not None:
        return _numeric(tables, list(input_columns), label_column, label_kind, n_train, n_test, split_seed)
    if tokenizer is None:
        msg = "dataset.text_column needs dataset.tokenizer: a local tokenizer folder or tokenizer.json"
        raise DataError(msg)
    tok = load_tokenizer(tokenizer, pad_token_id)
    rows, classes, kind = [], None, "none"
    for where, table in tables:
        texts = _column(table, text_column, where, "text_column")
        if not all(isinstance(t, str) for t in texts):
            msg = f"{where}: column {text_column!r} must hold text"
            raise DataError(msg)
        ids = [torch.tensor(seq[:max_length], dtype=torch.long) for seq in tok.encode(texts)]
        empty = [i for i, seq in enumerate(ids) if seq.numel() == 0]
        if empty:
            msg = f"{where}: row {empty[0]} tokenises to nothing; remove empty texts"
            raise DataError(msg)
        labels = None
        if label_column is not None:
            labels, kind, classes = _labels(
                _column(table, label_column, where, "label_column"), where, label_kind, classes
            )
        rows.append(TokenisedRows(ids, labels))
    if len(rows) == 1:
        train_idx, test_idx = split_positions(str(path), len(rows[0]), n_train, n_test, split_seed)
        train_rows = test_rows = rows[0]
    else:
        train_rows, test_rows = rows
        train_idx = _pick(len(train_rows), n_train, split_seed, str(path))
        test_idx = _pick(len(test_rows), n_test, split_seed, str(test_path))
    log.info(
        "%s: %d train + %d test rows, tokenizer %s, max_length %d",
        path,
        len(train_idx),
        len(test_idx),
        tok.source,
        max_length,
    )
    return TextSplit(
        str(path),
        Rows(train_rows, train_idx),
        Rows(test_rows, test_idx),
        train_idx,
        test_idx,
        tok.pad_token_id,
        classes,
        max_length,
        kind,
    )


def _numeric(
    tables: List[Tuple[str, Any]],
    input_columns: List[str],
    label_column: Optional[str],
    label_kind: str,
    n_train: Optional[int],
    n_test: Optional[int],
    split_seed: int,
) -> Split:
    if label_column is None:
        msg = "numeric dataset.input_columns need dataset.label_column"
        raise DataError(msg)
    xs, ys, classes = [], [], None
    for where, table in tables:
        columns = []
        for name in input_columns:
            values = _column(table, name, where, "input_columns")
            try:
                columns.append(torch.tensor(values, dtype=torch.float32))
            except (TypeError, ValueError) as exc:
                msg = f"{where}: input column {name!r} must be numeric ({exc})"
                raise DataError(msg) from exc
        x = torch.stack(columns, dim=1)
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            msg = f"{where} contains NaN or Inf inputs (first at row {int(bad.nonzero()[0, 0])})"
            raise DataError(msg)
        y, _, classes = _labels(
            _column(table, label_column, where, "label_column"), where, label_kind, classes
        )
        xs.append(x)
        ys.append(y)
    if len(xs) == 1:
        train_idx, test_idx = split_positions(tables[0][0], xs[0].shape[0], n_train, n_test, split_seed)
        x_train, y_train, x_test, y_test = (
            xs[0][train_idx],
            ys[0][train_idx],
            xs[0][test_idx],
            ys[0][test_idx],
        )
    else:
        train_idx = _pick(xs[0].shape[0], n_train, split_seed, tables[0][0])
        test_idx = _pick(xs[1].shape[0], n_test, split_seed, tables[1][0])
        x_train, y_train, x_test, y_test = (
            xs[0][train_idx],
            ys[0][train_idx],
            xs[1][test_idx],
            ys[1][test_idx],
        )
    return Split(Path(tables[0][0]).name, x_train, y_train, x_test, y_test, train_idx, test_idx)
