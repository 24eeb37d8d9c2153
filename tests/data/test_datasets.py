"""Built-in datasets and file loaders: seeded splits, shapes, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dattri_cli.data import digits, from_files, synthetic
from dattri_cli.errors import DataError


def test_digits_split_is_seeded_and_disjoint():
    a, b = digits(100, 20, split_seed=3), digits(100, 20, split_seed=3)
    assert torch.equal(a.train_indices, b.train_indices) and torch.equal(a.x_test, b.x_test)
    assert not set(a.train_indices.tolist()) & set(a.test_indices.tolist())
    assert a.x_train.shape == (100, 64) and a.num_classes == 10
    assert float(a.x_train.max()) <= 1.0
    assert not torch.equal(digits(100, 20, split_seed=4).train_indices, a.train_indices)


def test_synthetic_size_is_configurable_and_seeded():
    s = synthetic(n_samples=300, n_features=7, n_classes=4, n_train=200, n_test=50)
    assert s.x_train.shape == (200, 7) and s.num_classes == 4
    assert torch.equal(
        s.x_train, synthetic(n_samples=300, n_features=7, n_classes=4, n_train=200, n_test=50).x_train
    )


def test_fingerprint_changes_with_data():
    assert digits(50, 10).fingerprint() != digits(50, 11).fingerprint()


def test_separate_train_and_test_files(tmp_path):
    np.savez(tmp_path / "tr.npz", x=np.ones((30, 3), np.float32), y=np.arange(30) % 2)
    np.savez(tmp_path / "te.npz", x=np.zeros((8, 3), np.float32), y=np.ones(8, np.int64))
    s = from_files(tmp_path / "tr.npz", test_path=tmp_path / "te.npz")
    assert s.x_train.shape == (30, 3) and s.x_test.shape == (8, 3)
    with pytest.raises(DataError, match="do not fit"):
        from_files(tmp_path / "tr.npz", test_path=tmp_path / "te.npz", n_test=9)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b\n1,2\n", "no label column 'label'"),
        ("a,label\n1,x\n", "non-numeric"),
        ("a,label\n", "no rows"),
    ],
)
def test_bad_csv_is_refused(tmp_path, content, message):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        from_files(tmp_path / "d.csv")


def test_nan_inputs_are_refused(tmp_path):
    x = np.ones((10, 2), np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(10, np.int64))
    with pytest.raises(DataError, match="NaN"):
        from_files(tmp_path / "d.npz")


def test_unsupported_suffix_and_out_of_range(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        from_files(tmp_path / "d.txt")
    with pytest.raises(DataError, match="at least 1"):
        digits(0, 10)
