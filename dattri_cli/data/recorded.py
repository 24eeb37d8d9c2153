"""Rebuild the dataset a score file records, treating the file as untrusted data.

``dattri show`` and ``dattri plot`` want labels, file names, texts and pictures for
the rows of a score file, and the file records the dataset config of its run. That
config came from whoever wrote the file, so it is never handed to
``hydra.utils.instantiate`` and no name found in it is imported: its ``_target_`` is
only looked up in :data:`REGISTRY`, a fixed table of our own dataset builders, and
each argument must be one the builder takes, of a plain type (number, string, short
list of those, null). Anything else gives ``None`` and a one-line reason; the caller
shows the rest of the output (indices and scores) without labels.

What comes back is a :class:`RecordedData`: per row of the score file, its label
(and class name), and what identifies the sample to a person: the image file
(relative to its folder) for image folders, the decoded text for tokenised tables,
the row's values for tabular data, and a picture for image-like data.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from dattri_cli.data import Split, digits, from_files, synthetic
from dattri_cli.data.hf_table import TextSplit, hf_table
from dattri_cli.data.image_folder import ImageFolderSplit, image_folder
from dattri_cli.errors import DattriError

NOT_AVAILABLE = "labels not available for this dataset"
SIDES = ("train", "test")

Validator = Callable[[Any], bool]
Channels = Union[Tensor, Sequence[float], float]


def _plain(value: Any, allowed: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; only _BOOL accepts one
        return False
    return isinstance(value, allowed)


def _of(*allowed: type) -> Validator:
    return lambda value: _plain(value, allowed)


def _optional(check: Validator) -> Validator:
    return lambda value: value is None or check(value)


def _list_of(check: Validator, max_len: int) -> Validator:
    return lambda value: (
        isinstance(value, (list, tuple)) and 0 < len(value) <= max_len and all(map(check, value))
    )


def _either(*checks: Validator) -> Validator:
    return lambda value: any(check(value) for check in checks)


_INT = _of(int)
_OPT_INT = _optional(_INT)
_FLOAT = _of(int, float)
_STR = _of(str)
_OPT_STR = _optional(_STR)
_BOOL: Validator = lambda value: isinstance(value, bool)  # noqa: E731
_SIZE = _optional(_either(_INT, _list_of(_INT, 2)))  # image_size: side or [height, width]
_CHANNEL_VALUES = _optional(_either(_FLOAT, _list_of(_FLOAT, 4)))  # mean / std
_COLUMNS = _optional(_list_of(_STR, 10_000))  # numeric input columns


@dataclass(frozen=True)
class Recipe:
    """One built-in builder: the function, the plain-typed arguments it may receive, and its paths."""

    build: Callable[..., Any]
    params: Mapping[str, Validator]
    path_params: Tuple[str, ...] = ()  # must name existing files or folders (checked before reading)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # forced arguments (what show needs, cheaply)


_SPLIT_PARAMS = {"n_train": _OPT_INT, "n_test": _OPT_INT, "split_seed": _INT}

#: every dataset a score file may ask ``show``/``plot`` to rebuild, by recorded ``_target_``
REGISTRY: Dict[str, Recipe] = {
    "dattri_cli.data.digits": Recipe(digits, dict(_SPLIT_PARAMS)),
    "dattri_cli.data.synthetic": Recipe(
        synthetic,
        {
            "n_samples": _INT,
            "n_features": _INT,
            "n_classes": _INT,
            "class_sep": _FLOAT,
            "seed": _INT,
            **_SPLIT_PARAMS,
        },
    ),
    "dattri_cli.data.from_files": Recipe(
        from_files,
        {"path": _STR, "test_path": _OPT_STR, "label_column": _STR, **_SPLIT_PARAMS},
        path_params=("path", "test_path"),
    ),
    "dattri_cli.data.image_folder.image_folder": Recipe(
        image_folder,
        {
            "root": _OPT_STR,
            "train_root": _OPT_STR,
            "test_root": _OPT_STR,
            "image_size": _SIZE,
            "color": _STR,
            "mean": _CHANNEL_VALUES,
            "std": _CHANNEL_VALUES,
            "check_files": _BOOL,
            **_SPLIT_PARAMS,
        },
        path_params=("root", "train_root", "test_root"),
        fixed={"check_files": False},  # labels and names need no decoding of every header
    ),
    "dattri_cli.data.hf_table.hf_table": Recipe(
        hf_table,
        {
            "path": _STR,
            "test_path": _OPT_STR,
            "text_column": _OPT_STR,
            "input_columns": _COLUMNS,
            "label_column": _OPT_STR,
            "tokenizer": _OPT_STR,
            "max_length": _INT,
            "pad_token_id": _OPT_INT,
            "label_kind": _STR,
            "split": _STR,
            **_SPLIT_PARAMS,
        },
        path_params=("path", "test_path"),
    ),
}

#: synthetic data is generated in memory: a recorded size beyond this is not rebuilt
MAX_SYNTHETIC_VALUES = 50_000_000
#: characters of text kept per sample (``show`` and ``plot`` print one line each)
SNIPPET_CHARS = 80


def snippet(text: str, width: int = SNIPPET_CHARS) -> str:
    """``text`` on one line (newlines, tabs and backslashes escaped), cut to ``width`` characters."""
    flat = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def unnormalise(x: Tensor, mean: Channels, std: Channels) -> Tensor:
    """Undo ``(pixels - mean) / std`` on a ``(C, H, W)`` image: values back in ``[0, 1]`` for display.

    ``mean`` / ``std`` are per channel (a tensor broadcastable to ``(C, 1, 1)``, a list
    of ``C`` numbers, or one number); values outside ``[0, 1]`` are clipped.
    """
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if mean_t.dim() == 1:
        mean_t = mean_t.reshape(-1, 1, 1)
    if std_t.dim() == 1:
        std_t = std_t.reshape(-1, 1, 1)
    return (x * std_t + mean_t).clamp(0.0, 1.0)


def _minmax(x: Tensor) -> Tensor:
    """Values scaled to ``[0, 1]`` (a constant image becomes zeros)."""
    x = x.float()
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if float(high - low) > 0 else torch.zeros_like(x)


@dataclass
class Side:
    """What is known about the train (or test) rows of a score file, row by row."""

    indices: Tensor  # positions in the source dataset
    labels: Optional[Tensor] = None  # class indices (int64) or float targets, one per row
    path: Optional[Callable[[int], str]] = None  # file of a row, relative to its folder
    text: Optional[Callable[[int], str]] = None  # full text of a row (cut by ``snippet``)
    image: Optional[Callable[[int], Tensor]] = None  # (C, H, W) in [0, 1], ready to draw
    values: Optional[Callable[[int], Tensor]] = None  # a tabular row's input values


@dataclass
class RecordedData:
    """The rebuilt dataset as ``show`` / ``plot`` use it.

    ``kind`` is ``"image"`` (rows have pictures), ``"text"`` or ``"table"``;
    ``split`` the rebuilt split object (``None`` when only part of it could be
    read back); ``note`` says what is missing, in one line.
    """

    kind: str
    train: Side
    test: Side
    classes: Optional[List[str]] = None
    split: Any = None
    note: str = ""
    invert_gray: bool = False  # draw one-channel images dark on light (digits)

    def side(self, which: str) -> Side:
        """The ``"train"`` or ``"test"`` side."""
        return self.train if which == "train" else self.test

    def has_labels(self) -> bool:
        """Whether rows have labels (language-model data has none)."""
        return self.train.labels is not None

    def describe(self, which: str, row: int) -> Dict[str, Any]:
        """JSON-ready facts of one row: ``label`` (and ``class``), ``path`` or ``text`` where known."""
        side = self.side(which)
        out: Dict[str, Any] = {}
        if side.labels is not None:
            value = side.labels[row]
            out["label"] = float(value) if value.is_floating_point() else int(value)
            if (
                self.classes is not None
                and isinstance(out["label"], int)
                and 0 <= out["label"] < len(self.classes)
            ):
                out["class"] = self.classes[out["label"]]
        if side.path is not None:
            out["path"] = side.path(row)
        if side.text is not None:
            out["text"] = snippet(side.text(row))
        return out

    def image(self, which: str, row: int) -> Optional[Tensor]:
        """Row ``row`` as a ``(C, H, W)`` picture in ``[0, 1]``, or None for non-image data."""
        side = self.side(which)
        return None if side.image is None else side.image(row)

    def values(self, which: str, row: int, width: int = 40) -> Optional[str]:
        """A tabular row's first input values, as a short line."""
        side = self.side(which)
        if side.values is None:
            return None
        return snippet(", ".join(f"{v:.3g}" for v in side.values(row).flatten()[:16].tolist()), width)


@dataclass
class _Labels:
    """The label part of a split, for :func:`~dattri_cli.data.noise.flip_labels` (it needs these fields only)."""

    y_train: Tensor
    y_test: Tensor
    num_classes: int


def _check_kwargs(
    node: Mapping[str, Any], recipe: Recipe, target: str
) -> Tuple[Optional[Dict[str, Any]], str]:
    from dattri_cli.data.noise import NOISE_KEYS  # noqa: PLC0415

    accepted = set(inspect.signature(recipe.build).parameters)
    kwargs: Dict[str, Any] = {}
    for key, value in node.items():
        if key == "_target_" or key in NOISE_KEYS:
            continue
        check = recipe.params.get(key)
        if check is None or key not in accepted or not check(value):
            return (
                None,
                f"{NOT_AVAILABLE} (recorded dataset.{key}={str(value)[:40]!r} is not an argument of {target})",
            )
        kwargs[key] = list(value) if isinstance(value, tuple) else value
    return kwargs, ""


def _missing_path(kwargs: Mapping[str, Any], recipe: Recipe) -> Optional[str]:
    for key in recipe.path_params:
        value = kwargs.get(key)
        if value is not None and not Path(value).expanduser().exists():
            return str(value)
    return None


@contextlib.contextmanager
def _quiet(tables: bool) -> Iterator[None]:
    """No log lines or progress bars while a dataset is rebuilt for display (they would mix with the output)."""
    logger = logging.getLogger("dattri_cli")
    level = logger.level
    logger.setLevel(logging.WARNING)
    bars = None
    if tables:
        try:
            from datasets.utils import logging as bars  # noqa: PLC0415 - optional, only for tables
        except ImportError:
            bars = None
    bars_were_on = bars is not None and bars.is_progress_bar_enabled()
    try:
        if bars_were_on:
            bars.disable_progress_bar()
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            bars.enable_progress_bar()


def rebuild_recorded_data(
    config: Any, train_indices: Tensor, test_indices: Tensor
) -> Tuple[Optional[RecordedData], str]:
    """``(data, note)`` for a recorded dataset config we know, else ``(None, reason)``.

    Only :data:`REGISTRY` builders run, with checked plain arguments; recorded label
    noise is re-applied with our own :func:`~dattri_cli.data.noise.flip_labels`. The
    rebuilt split must pick the rows the score file names (``train_indices`` /
    ``test_indices``), else nothing is shown for them.
    """
    node = config.get("dataset") if isinstance(config, Mapping) else None
    tables = isinstance(node, Mapping) and node.get("_target_") == "dattri_cli.data.hf_table.hf_table"
    with _quiet(tables):
        return _rebuild(config, train_indices, test_indices)


def _rebuild(config: Any, train_indices: Tensor, test_indices: Tensor) -> Tuple[Optional[RecordedData], str]:
    from dattri_cli.data.noise import NOISE_KEYS, flip_labels  # noqa: PLC0415

    node = config.get("dataset") if isinstance(config, Mapping) else None
    if not isinstance(node, Mapping):
        return None, f"{NOT_AVAILABLE} (the file records no dataset config)"
    target = node.get("_target_")
    recipe = REGISTRY.get(target) if isinstance(target, str) else None
    if recipe is None:
        return (
            None,
            f"{NOT_AVAILABLE} ({str(target)[:80]!r} is not a built-in dataset; nothing named in a "
            "score file is imported)",
        )
    kwargs, reason = _check_kwargs(node, recipe, target)
    if kwargs is None:
        return None, reason
    missing = _missing_path(kwargs, recipe)
    if missing is not None:
        return None, f"{NOT_AVAILABLE} (the recorded data {missing} does not exist here)"
    if recipe.build is synthetic:
        size = int(kwargs.get("n_samples", 2000)) * int(kwargs.get("n_features", 20))
        if size > MAX_SYNTHETIC_VALUES:
            return None, f"{NOT_AVAILABLE} (the recorded synthetic data is too large to regenerate)"
    fraction, noise_seed = node.get(NOISE_KEYS[0], 0.0), node.get(NOISE_KEYS[1], 0)
    if not _plain(fraction or 0.0, (int, float)) or not _plain(noise_seed or 0, (int,)):
        return None, f"{NOT_AVAILABLE} (recorded label noise settings are not numbers)"
    tokenizer = kwargs.get("tokenizer")
    if recipe.build is hf_table and tokenizer is not None and not Path(tokenizer).expanduser().exists():
        return _raw_text(
            kwargs, train_indices, test_indices, f"the recorded tokenizer {tokenizer} does not exist here"
        )
    try:
        split = recipe.build(**{**kwargs, **recipe.fixed})
    except (DattriError, ValueError, TypeError, OSError, KeyError, IndexError) as exc:
        return None, f"{NOT_AVAILABLE} ({str(exc).strip()[:160]})"
    if not (
        torch.equal(split.train_indices, train_indices.to(split.train_indices.dtype))
        and torch.equal(split.test_indices, test_indices.to(split.test_indices.dtype))
    ):
        return None, f"{NOT_AVAILABLE} (the rebuilt split does not match the file)"
    try:
        data = _describe_split(split, target, kwargs)
    except (DattriError, ValueError, TypeError, OSError, KeyError, IndexError) as exc:
        return None, f"{NOT_AVAILABLE} ({str(exc).strip()[:160]})"
    if float(fraction or 0.0) > 0 and data.train.labels is not None:
        if data.train.labels.is_floating_point():
            return None, f"{NOT_AVAILABLE} (label noise is recorded for non-class labels)"
        labels = _Labels(data.train.labels, data.test.labels, _num_classes(split, data))
        try:
            labels, _ = flip_labels(labels, float(fraction), int(noise_seed or 0))
        except (DattriError, ValueError, RuntimeError) as exc:
            return None, f"{NOT_AVAILABLE} ({str(exc).strip()[:160]})"
        data.train.labels = labels.y_train
    return data, data.note


def _num_classes(split: Any, data: RecordedData) -> int:
    if data.classes is not None:
        return len(data.classes)
    if isinstance(split, Split):
        return split.num_classes
    return int(max(data.train.labels.max(), data.test.labels.max())) + 1  # type: ignore[union-attr]


def _describe_split(split: Any, target: str, kwargs: Mapping[str, Any]) -> RecordedData:
    if isinstance(split, ImageFolderSplit):
        return _image_folder_data(split)
    if isinstance(split, TextSplit):
        return _text_data(split, kwargs)
    if isinstance(split, Split):
        return _tensor_data(split, target, kwargs)
    msg = f"unexpected split type {type(split).__name__}"
    raise TypeError(msg)


def _image_folder_data(split: ImageFolderSplit) -> RecordedData:
    def make(which: str) -> Side:
        view = split.train if which == "train" else split.test
        dataset, positions = view.dataset, view.indices

        def path(row: int) -> str:
            file = dataset.samples[int(positions[row])][0]
            return file.relative_to(dataset.root).as_posix()

        def image(row: int) -> Tensor:
            return unnormalise(dataset.load(int(positions[row])), dataset.mean, dataset.std)

        labels = split.y_train if which == "train" else split.y_test
        return Side(positions, labels, path=path, image=image)

    return RecordedData("image", make("train"), make("test"), list(split.classes), split)


def load_decoder(path: Union[str, Path]) -> Callable[[List[int]], str]:
    """``ids -> text`` with a local tokenizer (``tokenizer.json`` via ``tokenizers``, else transformers).

    Special tokens (padding) are skipped. Only local files are read; no code is run.
    """
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        from tokenizers import Tokenizer  # noqa: PLC0415 - optional dependency, only for text data

        tok = Tokenizer.from_file(str(file))
        return lambda ids: tok.decode(ids, skip_special_tokens=True)
    from transformers import AutoTokenizer  # noqa: PLC0415 - optional dependency, only for text data

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _text_data(split: TextSplit, kwargs: Mapping[str, Any]) -> RecordedData:
    decode = load_decoder(kwargs["tokenizer"])

    def make(which: str) -> Side:
        view = split.train if which == "train" else split.test
        labels = split.y_train if which == "train" else split.y_test

        def text(row: int) -> str:
            return decode(view[row]["input_ids"].tolist())

        return Side(view.indices, labels, text=text)

    return RecordedData("text", make("train"), make("test"), split.classes, split)


def _raw_text(
    kwargs: Mapping[str, Any], train_indices: Tensor, test_indices: Tensor, why: str
) -> Tuple[Optional[RecordedData], str]:
    """The text (and label) columns read straight from the recorded table(s) at the file's positions."""
    from dattri_cli.data.hf_table import _labels, read_table  # noqa: PLC0415

    text_column, label_column = kwargs.get("text_column"), kwargs.get("label_column")
    if text_column is None:
        return None, f"{NOT_AVAILABLE} ({why})"
    try:
        tables = [read_table(kwargs["path"], kwargs.get("split", "train"))]
        if kwargs.get("test_path") is not None:
            tables.append(read_table(kwargs["test_path"], kwargs.get("split", "train")))
        texts = [list(t[text_column]) for t in tables]
        labels: List[Optional[Tensor]] = [None] * len(tables)
        classes = None
        if label_column is not None:
            for i, (table, where) in enumerate(zip(tables, (kwargs["path"], kwargs.get("test_path")))):
                labels[i], _, classes = _labels(
                    list(table[label_column]), str(where), kwargs.get("label_kind", "auto"), classes
                )
    except (DattriError, ValueError, TypeError, OSError, KeyError) as exc:
        return None, f"{NOT_AVAILABLE} ({why}; {str(exc).strip()[:120]})"
    train_texts, test_texts = texts[0], texts[-1]
    train_labels, test_labels = labels[0], labels[-1]
    for positions, column in ((train_indices, train_texts), (test_indices, test_texts)):
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= len(column)):
            return None, f"{NOT_AVAILABLE} ({why}; the table has fewer rows than the file names)"

    def make(positions: Tensor, column: List[Any], label_values: Optional[Tensor]) -> Side:
        positions = positions.long()
        return Side(
            positions,
            None if label_values is None else label_values[positions],
            text=lambda row: str(column[int(positions[row])]),
        )

    data = RecordedData(
        "text",
        make(train_indices, train_texts, train_labels),
        make(test_indices, test_texts, test_labels),
        classes,
        note=f"{why}; showing the table's {text_column!r} column (labels as written, without label noise)",
    )
    return data, data.note


def _tensor_data(split: Split, target: str, kwargs: Mapping[str, Any]) -> RecordedData:
    """Built-in tensor splits: digits are 8x8 pictures, image-shaped files are pictures, the rest tables."""
    shape = tuple(split.x_train.shape[1:])
    to_image: Optional[Callable[[Tensor], Tensor]] = None
    invert = False
    if target == "dattri_cli.data.digits":
        side = math.isqrt(int(split.x_train[0].numel()))
        to_image, invert = (lambda x: x.reshape(1, side, side).clamp(0, 1)), True
    elif target == "dattri_cli.data.from_files" and not str(kwargs.get("path", "")).lower().endswith(".csv"):
        if len(shape) == 3 and shape[0] in (1, 3):
            to_image = _minmax
        elif len(shape) == 2:
            to_image = lambda x: _minmax(x).unsqueeze(0)  # noqa: E731
        elif len(shape) == 1 and shape[0] >= 64 and math.isqrt(shape[0]) ** 2 == shape[0]:
            side = math.isqrt(shape[0])
            to_image, invert = (lambda x: _minmax(x).reshape(1, side, side)), True

    def make(x: Tensor, y: Tensor, positions: Tensor) -> Side:
        if to_image is not None:
            return Side(positions, y, image=lambda row: to_image(x[row]))
        return Side(positions, y, values=lambda row: x[row])

    return RecordedData(
        "image" if to_image is not None else "table",
        make(split.x_train, split.y_train, split.train_indices),
        make(split.x_test, split.y_test, split.test_indices),
        split=split,
        invert_gray=invert,
    )
