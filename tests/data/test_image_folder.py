"""Image folders read with Pillow: labels from sorted class names, lazy decoding, preprocessing, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dattri_cli.data import split_positions
from dattri_cli.errors import DataError

Image = pytest.importorskip("PIL.Image")

from dattri_cli.data.image_folder import ImageFolderDataset, image_folder  # noqa: E402


def _write_tree(root: Path, counts: Dict[str, int], size=(6, 5), mode: str = "RGB") -> Dict[str, List[Path]]:
    """``counts[class]`` images per class; pixel (0, 0) encodes the class and the file number."""
    written: Dict[str, List[Path]] = {}
    for c, (name, count) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = Image.new(mode, size, color=(10 * c, 20 + i, 200) if mode == "RGB" else 10 * c + i)
            path = root / name / f"img{i:03d}.png"
            image.save(path)
            written.setdefault(name, []).append(path)
    return written


def test_labels_follow_sorted_class_names_and_pixels_are_scaled(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"zebra": 2, "ant": 3, "moth": 1}, size=(5, 4))
    data = ImageFolderDataset(tmp_path, image_size=None)
    assert data.classes == ["ant", "moth", "zebra"]
    assert data.targets.tolist() == [0, 0, 0, 1, 2, 2]
    x, y = data[4]
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32 and int(y) == 2
    # zebra (class index 2 when written in sorted order) has red 20, file 0 green 20, blue 200
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([20.0, 20.0, 200.0]) / 255)


def test_resize_grayscale_and_normalisation(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 1, "b": 1}, size=(9, 7))
    data = ImageFolderDataset(tmp_path, image_size=[3, 4], color="grayscale", mean=0.5, std=0.25)
    x, _ = data[0]
    assert x.shape == (1, 3, 4) and data.sample_shape == (1, 3, 4)
    gray = Image.open(data.samples[0][0]).convert("L").getpixel((0, 0)) / 255
    torch.testing.assert_close(x, torch.full((1, 3, 4), (gray - 0.5) / 0.25))
    rgb = ImageFolderDataset(tmp_path, image_size=2, mean=[0.1, 0.2, 0.3], std=[1, 2, 4])
    raw = ImageFolderDataset(tmp_path, image_size=2)
    torch.testing.assert_close(
        rgb[1][0] * torch.tensor([1.0, 2, 4])[:, None, None] + torch.tensor([0.1, 0.2, 0.3])[:, None, None],
        raw[1][0],
    )


def test_images_are_decoded_only_on_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tree(tmp_path, {"a": 3, "b": 3})
    split = image_folder(tmp_path, n_train=4, n_test=2, check_files=False)
    calls: List[int] = []
    original = ImageFolderDataset.load
    monkeypatch.setattr(ImageFolderDataset, "load", lambda self, i: calls.append(i) or original(self, i))
    assert split.y_train.numel() == 4 and calls == []
    train, _ = split.loaders(2, 2)
    x, y = next(iter(train))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert calls == split.train_indices[:2].tolist()


def test_split_follows_the_shared_rules(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 5, "b": 5})
    split = image_folder(tmp_path, n_train=6, n_test=3, split_seed=7)
    train_idx, test_idx = split_positions("x", 10, 6, 3, 7)
    assert torch.equal(split.train_indices, train_idx) and torch.equal(split.test_indices, test_idx)
    default = image_folder(tmp_path)
    assert (len(default.train), len(default.test)) == (8, 2)
    assert split.num_classes == 2 and split.num_features == 3 * 32 * 32
    with pytest.raises(DataError, match="fewer than n_train"):
        image_folder(tmp_path, n_train=8, n_test=3)
    assert split.fingerprint() == image_folder(tmp_path, n_train=6, n_test=3, split_seed=7).fingerprint()
    assert split.fingerprint() != image_folder(tmp_path, n_train=6, n_test=3, split_seed=8).fingerprint()


def test_separate_train_and_test_roots(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    _write_tree(tmp_path / "test", {"a": 1, "c": 2})
    split = image_folder(train_root=tmp_path / "train", test_root=tmp_path / "test", image_size=4)
    assert (len(split.train), len(split.test)) == (7, 3)
    assert sorted(split.y_test.tolist()) == [0, 2, 2]  # test folder "c" keeps the train label of "c"
    _write_tree(tmp_path / "odd", {"a": 1, "d": 1})
    with pytest.raises(DataError, match=r"class folders \['d'\] that the training folder lacks"):
        image_folder(train_root=tmp_path / "train", test_root=tmp_path / "odd")
    with pytest.raises(DataError, match="not both"):
        image_folder(tmp_path / "train", train_root=tmp_path / "train", test_root=tmp_path / "test")


def test_refusals_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path / "flat")
    _write_tree(tmp_path / "emptyclass", {"a": 2})
    (tmp_path / "emptyclass" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        image_folder(tmp_path / "emptyclass")
    _write_tree(tmp_path / "bad", {"a": 2, "b": 2})
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*broken.png") as info:
        image_folder(tmp_path / "bad")
    assert "\n" not in str(info.value)
    # unchecked, the broken file is refused when it is decoded
    data = ImageFolderDataset(tmp_path / "bad", check_files=False)
    broken = [i for i, (p, _) in enumerate(data.samples) if p.name == "broken.png"][0]
    with pytest.raises(DataError, match="broken.png"):
        data[broken]
    with pytest.raises(DataError, match="color"):
        ImageFolderDataset(tmp_path / "bad", color="cmyk")
    with pytest.raises(DataError, match="mean needs 1 or 3"):
        ImageFolderDataset(tmp_path / "bad", mean=[0.1, 0.2], check_files=False)


def test_image_folder_feeds_the_cnn_through_attributors(tmp_path: Path) -> None:
    from dattri_cli.algorithm.influence_function import IFAttributorDataInf
    from dattri_cli.algorithm.tracin import TracInAttributor
    from dattri_cli.models import SmallCNN
    from dattri_cli.task import AttributionTask
    from dattri_cli.tasks import classification

    _write_tree(tmp_path, {"a": 4, "b": 4, "c": 4}, size=(10, 6))
    split = image_folder(tmp_path, image_size=[6, 10], n_train=8, n_test=3, mean=0.5, std=0.5)
    torch.manual_seed(0)
    model = SmallCNN(
        split.num_features,
        split.num_classes,
        channels=4,
        image_size=list(split.sample_shape[1:]),
        in_channels=split.sample_shape[0],
    )
    funcs = classification(model, sample_ndim=len(split.sample_shape))
    task = AttributionTask(funcs.loss_func, model, [model.state_dict()], funcs.target_func)
    tracin = TracInAttributor(task, [1.0], normalized_grad=False)
    tracin.cache()
    scores = tracin.attribute(*split.loaders(3, 2))
    datainf = IFAttributorDataInf(task, regularization=0.1)
    datainf.cache(split.loaders(3, 2)[0])
    influence = datainf.attribute(*split.loaders(3, 2))
    for s in (scores, influence):
        assert s.shape == (8, 3) and bool(torch.isfinite(s).all()) and float(s.abs().max()) > 0
