"""Image folders (``root/<class>/<image>``) read with Pillow, decoded lazily.

Why: the people who most want attribution often arrive with a folder of their own
images. torchvision's ``ImageFolder`` would read them, but torchvision's PyPI wheels
do not import next to the CPU build of torch we install, so this module reads the
same layout with Pillow alone: class folder names sorted give the labels ``0..K-1``,
each image is decoded only when ``__getitem__`` asks for it (never all held in
memory), resized to ``image_size``, converted to RGB or grayscale and normalised with
``mean`` / ``std`` into a float tensor ``(C, H, W)``.

:func:`image_folder` returns an :class:`ImageFolderSplit` with the same seeded split
rules as the other datasets (:func:`dattri_cli.data.split_positions`), or the whole of
``train_root`` and ``test_root`` when both are given. Anything unusable (a missing or
empty folder, a class without images, a file Pillow cannot read) is one
:class:`~dattri_cli.errors.DataError` line naming the path.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dattri_cli.data import split_positions
from dattri_cli.errors import DataError

log = logging.getLogger("dattri_cli")

#: file name endings read as images (lower case); other files are skipped
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: ``color`` values and the Pillow mode each converts to
COLOR_MODES = {"rgb": "RGB", "grayscale": "L"}

Size = Union[int, Sequence[int]]


def _pillow() -> Any:
    """The ``PIL.Image`` module, or one line naming the extra that provides it."""
    try:
        from PIL import Image  # noqa: PLC0415 - optional dependency, only for image data
    except ImportError as exc:
        msg = "reading image folders needs Pillow: pip install 'dattri-cli[vision]'"
        raise DataError(msg) from exc
    return Image


def _size_hw(image_size: Optional[Size]) -> Optional[Tuple[int, int]]:
    """``image_size`` as ``(height, width)``: an int is a square side."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        msg = f"dataset.image_size must be a positive int or [height, width], got {image_size!r}"
        raise DataError(msg)
    return size  # type: ignore[return-value]


def scan_image_folder(root: Union[str, Path]) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """Sorted class names and ``(file, label)`` pairs, files sorted within each class.

    Hidden entries and files without an image ending are skipped; a class folder
    with no images, or a root without class folders, is refused.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        msg = f"image folder not found: {root} (it must hold one sub-folder of images per class)"
        raise DataError(msg)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        msg = f"image folder {root} has no class folders; lay it out as {root}/<class>/<image>"
        raise DataError(msg)
    samples: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            msg = (
                f"class folder {root / name} holds no images (endings {', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove it"
            )
            raise DataError(msg)
        samples.extend((f, label) for f in files)
    return classes, samples


class ImageFolderDataset(Dataset):
    """Images of ``root/<class>/<image>`` as ``(float tensor (C, H, W), int64 label)``, decoded on access."""

    def __init__(
        self,
        root: Union[str, Path],
        image_size: Optional[Size] = 32,
        color: str = "rgb",
        mean: Optional[Union[float, Sequence[float]]] = None,
        std: Optional[Union[float, Sequence[float]]] = None,
        classes: Optional[Sequence[str]] = None,
        check_files: bool = True,
    ) -> None:
        """Scan ``root`` (files are opened only to check their headers when ``check_files``).

        Args:
            root: the folder of class folders.
            image_size: every image is resized to this (an int: square; ``[h, w]``);
                ``None`` keeps the size of the images, which must then all agree.
            color: ``"rgb"`` (3 channels) or ``"grayscale"`` (1 channel).
            mean, std: per-channel (or one for all) normalisation after scaling
                pixels to ``[0, 1]``; ``None`` leaves the ``[0, 1]`` values.
            classes: the class names to use (for a test root: those of its train
                root); every folder of ``root`` must be one of them.
            check_files: open every file's header now, so an unreadable image is
                refused before any training or attribution starts.
        """
        self.root = Path(root).expanduser()
        if color not in COLOR_MODES:
            msg = f"dataset.color must be one of {sorted(COLOR_MODES)}, got {color!r}"
            raise DataError(msg)
        self.color, self.mode = color, COLOR_MODES[color]
        self.size = _size_hw(image_size)
        found, samples = scan_image_folder(self.root)
        if classes is None:
            self.classes = found
            self.samples = samples
        else:
            self.classes = list(classes)
            unknown = [c for c in found if c not in self.classes]
            if unknown:
                msg = (
                    f"{self.root} has class folders {unknown} that the training folder lacks "
                    f"(classes: {self.classes})"
                )
                raise DataError(msg)
            self.samples = [(f, self.classes.index(found[label])) for f, label in samples]
        channels = 3 if color == "rgb" else 1
        self.mean = self._per_channel("mean", mean, channels, 0.0)
        self.std = self._per_channel("std", std, channels, 1.0)
        if bool((self.std <= 0).any()):
            msg = f"dataset.std must be positive, got {std!r}"
            raise DataError(msg)
        if check_files:
            for path, _ in self.samples:
                self._open(path).close()
        if self.size is None:
            with self._open(self.samples[0][0]) as first:
                self.size = (first.height, first.width)

    @staticmethod
    def _per_channel(
        name: str, value: Optional[Union[float, Sequence[float]]], channels: int, default: float
    ) -> Tensor:
        if value is None:
            return torch.full((channels, 1, 1), default)
        values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            msg = f"dataset.{name} needs 1 or {channels} values for {channels}-channel images, got {len(values)}"
            raise DataError(msg)
        return torch.tensor(values).reshape(channels, 1, 1)

    def _open(self, path: Path) -> Any:
        image_module = _pillow()
        try:
            return image_module.open(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = f"cannot read image {path} ({reason}); remove or replace it"
            raise DataError(msg) from exc

    @property
    def num_classes(self) -> int:
        """Number of class folders."""
        return len(self.classes)

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of every sample."""
        assert self.size is not None
        return (3 if self.color == "rgb" else 1, *self.size)

    @property
    def targets(self) -> Tensor:
        """Every sample's label, without decoding any image."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.samples)

    def load(self, index: int) -> Tensor:
        """Image ``index`` as a normalised float tensor ``(C, H, W)``."""
        import numpy as np  # noqa: PLC0415

        path, _ = self.samples[index]
        with self._open(path) as image:
            try:
                image = image.convert(self.mode)
                height, width = self.size  # type: ignore[misc]
                if (image.height, image.width) != (height, width):
                    image = image.resize((width, height), resample=_pillow().Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                msg = f"cannot decode image {path} ({reason}); remove or replace it"
                raise DataError(msg) from exc
        x = torch.from_numpy(pixels.copy())
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        """``(image, label)`` of sample ``index``, decoded now."""
        return self.load(index), torch.tensor(self.samples[index][1], dtype=torch.long)

    def fingerprint_update(self, digest: Any) -> None:
        """Feed the files (relative names, labels, bytes) and preprocessing into ``digest``."""
        digest.update(
            repr(
                (
                    self.size,
                    self.color,
                    self.mean.flatten().tolist(),
                    self.std.flatten().tolist(),
                    self.classes,
                )
            ).encode()
        )
        for path, label in self.samples:
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{label}\0".encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)


class Positions(Dataset):
    """The samples of ``dataset`` at ``indices``, in that order."""

    def __init__(self, dataset: ImageFolderDataset, indices: Tensor) -> None:
        """Keep the dataset and the positions (int64)."""
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        """Number of positions."""
        return int(self.indices.numel())

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        """Sample ``indices[i]`` of the dataset."""
        return self.dataset[int(self.indices[i])]


@dataclass
class ImageFolderSplit:
    """Train and test views of image folders, with positions in the (sorted) source folders.

    Like :class:`dattri_cli.data.Split` but lazy: ``train`` / ``test`` decode images
    only when indexed. ``train_indices`` / ``test_indices`` are positions in the
    sorted file list of the train (or only) root and of the test root.
    """

    name: str
    train: Positions
    test: Positions
    train_indices: Tensor
    test_indices: Tensor
    classes: List[str] = field(default_factory=list)

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of every sample."""
        return self.train.dataset.sample_shape

    @property
    def num_features(self) -> int:
        """Number of input values per sample (``C * H * W``)."""
        c, h, w = self.sample_shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        """Number of classes (class folders of the train root)."""
        return len(self.classes)

    @property
    def y_train(self) -> Tensor:
        """Training labels (read from folder names, no decoding)."""
        return self.train.dataset.targets[self.train_indices]

    @property
    def y_test(self) -> Tensor:
        """Test labels (read from folder names, no decoding)."""
        return self.test.dataset.targets[self.test_indices]

    def fingerprint(self) -> str:
        """SHA-256 of the image files, labels, preprocessing and chosen positions."""
        digest = hashlib.sha256()
        self.train.dataset.fingerprint_update(digest)
        if self.test.dataset is not self.train.dataset:
            self.test.dataset.fingerprint_update(digest)
        for t in (self.train_indices, self.test_indices):
            digest.update(t.contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def loaders(
        self, train_batch_size: int, test_batch_size: int, num_workers: int = 0
    ) -> Tuple[DataLoader, DataLoader]:
        """Unshuffled loaders yielding ``(images (B, C, H, W), labels (B,))``."""
        train = DataLoader(self.train, batch_size=train_batch_size, shuffle=False, num_workers=num_workers)
        test = DataLoader(self.test, batch_size=test_batch_size, shuffle=False, num_workers=num_workers)
        return train, test


def image_folder(
    root: Optional[Union[str, Path]] = None,
    train_root: Optional[Union[str, Path]] = None,
    test_root: Optional[Union[str, Path]] = None,
    image_size: Optional[Size] = 32,
    color: str = "rgb",
    mean: Optional[Union[float, Sequence[float]]] = None,
    std: Optional[Union[float, Sequence[float]]] = None,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    split_seed: int = 0,
    check_files: bool = True,
) -> ImageFolderSplit:
    """Your own images: one ``root`` split by seed, or ``train_root`` + ``test_root``.

    With ``root`` the split follows :func:`dattri_cli.data.split_positions` (the
    rules of every dataset here). With two roots the test root's classes must be
    among the train root's; each root gives ``n_train`` / ``n_test`` samples (all
    when ``None``) picked by a ``split_seed``-seeded permutation of its files.
    """
    options = {"image_size": image_size, "color": color, "mean": mean, "std": std, "check_files": check_files}
    if root is not None:
        if train_root is not None or test_root is not None:
            msg = "give dataset.root, or dataset.train_root and dataset.test_root, not both"
            raise DataError(msg)
        dataset = ImageFolderDataset(root, **options)  # type: ignore[arg-type]
        train_idx, test_idx = split_positions(str(root), len(dataset), n_train, n_test, split_seed)
        split = ImageFolderSplit(
            str(root),
            Positions(dataset, train_idx),
            Positions(dataset, test_idx),
            train_idx,
            test_idx,
            dataset.classes,
        )
        log.info(
            "%s: %d images, %d classes -> %d train + %d test (split_seed %d)",
            root,
            len(dataset),
            dataset.num_classes,
            len(train_idx),
            len(test_idx),
            split_seed,
        )
        return split
    if train_root is None or test_root is None:
        msg = "image data needs dataset.root (split by seed) or both dataset.train_root and dataset.test_root"
        raise DataError(msg)
    train_set = ImageFolderDataset(train_root, **options)  # type: ignore[arg-type]
    test_set = ImageFolderDataset(test_root, classes=train_set.classes, **options)  # type: ignore[arg-type]
    picks = []
    for where, dataset, count in (("train", train_set, n_train), ("test", test_set, n_test)):
        total = len(dataset)
        count = total if count is None else count
        if count < 1 or count > total:
            msg = f"dataset.n_{where}={count} does not fit {dataset.root} ({total} images)"
            raise DataError(msg)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(split_seed))
        picks.append(order[:count])
    train_idx, test_idx = picks
    name = f"{train_root}+{test_root}"
    return ImageFolderSplit(
        name,
        Positions(train_set, train_idx),
        Positions(test_set, test_idx),
        train_idx,
        test_idx,
        train_set.classes,
    )
