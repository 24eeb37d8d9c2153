"""models.train: checkpoint files are written atomically and keyed by what they were trained on."""

from __future__ import annotations

import json
import os
import stat

import torch

from dattri_cli.data import digits
from dattri_cli.hashing import file_sha256, json_sha256
from dattri_cli.models import LogisticRegression
from dattri_cli.models.train import TrainSettings, cache_key, save_state_dict, trained_checkpoints


def test_cache_key_is_a_short_json_hash():
    assert cache_key({"b": 1, "a": 2}) == json_sha256({"a": 2, "b": 1})[:16]


def test_checkpoint_save_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "deep" / "model.safetensors"
    save_state_dict({"w": torch.ones(2, 2)}, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.safetensors"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_trained_checkpoints_are_cached_with_a_manifest(tmp_path):
    split = digits(30, 5)
    settings = TrainSettings(epochs=1)

    def build():
        return LogisticRegression(split.num_features, split.num_classes)

    first = trained_checkpoints(build, split, settings, 0, tmp_path, {"model": "lr"})
    again = trained_checkpoints(build, split, settings, 0, tmp_path, {"model": "lr"})
    assert [c.path for c in first] == [c.path for c in again]
    manifest = json.loads((first[0].path.parent / "manifest.json").read_text())
    assert manifest[0]["sha256"] == file_sha256(first[0].path)
