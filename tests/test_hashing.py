"""hashing: one SHA-256 per kind of identity, equal to the keys the caches have always used."""

from __future__ import annotations

import hashlib
import json

import torch

from dattri_cli import hashing
from dattri_cli.data import digits
from dattri_cli.feature_cache import cache_key, train_fingerprint


def test_json_hash_ignores_key_order_and_writes_unknown_values_as_text():
    assert hashing.json_sha256({"a": 1, "b": [2, 3]}) == hashing.json_sha256({"b": [2, 3], "a": 1})
    expected = hashlib.sha256(json.dumps({"p": "x"}, sort_keys=True).encode()).hexdigest()
    assert hashing.json_sha256({"p": "x"}) == expected
    assert hashing.json_sha256({"dtype": torch.float32}) == hashing.json_sha256({"dtype": "torch.float32"})
    assert cache_key({"k": 1}) == hashing.json_sha256({"k": 1})


def test_file_hash_is_the_hash_of_the_bytes(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 10_000  # several read chunks
    path.write_bytes(data)
    assert hashing.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_data_fingerprints_with_and_without_layout():
    split = digits(50, 10)
    train = (split.x_train, split.y_train, split.train_indices)
    assert hashing.data_fingerprint(train, with_layout=True) == train_fingerprint(*train)
    assert hashing.data_fingerprint(train) != hashing.data_fingerprint(train, with_layout=True)
    every = (
        split.x_train,
        split.y_train,
        split.x_test,
        split.y_test,
        split.train_indices,
        split.test_indices,
    )
    assert split.fingerprint() == hashing.data_fingerprint(every)
    same_bytes = torch.zeros(4, dtype=torch.int32)
    assert hashing.data_fingerprint([same_bytes]) == hashing.data_fingerprint(
        [torch.zeros(2, dtype=torch.int64)]
    )
    assert hashing.data_fingerprint([same_bytes], True) != hashing.data_fingerprint(
        [torch.zeros(2, dtype=torch.int64)], True
    )


def test_tensor_hash_covers_dtype_shape_and_values():
    a = torch.arange(6.0)
    assert hashing.tensor_sha256(a) == hashing.tensor_sha256(a.clone())
    assert hashing.tensor_sha256(a) != hashing.tensor_sha256(a.reshape(2, 3))
    assert hashing.tensor_sha256(a) != hashing.tensor_sha256(a.double())
    assert hashing.tensor_sha256(torch.empty(0)) != hashing.tensor_sha256(torch.empty(0, dtype=torch.int64))
