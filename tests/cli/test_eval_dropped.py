"""`dattri eval` says how many test samples the LDS used and why the others were left out."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dattri_cli import cli
from dattri_cli.data import from_files
from dattri_cli.groundtruth import KIND, groundtruth_key
from dattri_cli.io import save_scores, write_tensor_file

CONFIG = {"dataset": {"_target_": "dattri_cli.data.digits"}, "model": {}, "train": {}}


def test_lds_reports_left_out_test_samples(tmp_path, capsys, caplog):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 4, generator=gen)
    save_scores(tmp_path / "s.safetensors", scores, torch.arange(8), torch.arange(4), {"config": CONFIG})
    targets = torch.rand(5, 4, generator=gen)
    targets[:, 2] = 0.7  # the same retrained loss on every subset: no ranking to compare
    subsets = torch.stack([torch.randperm(8, generator=gen)[:4].sort().values for _ in range(5)])
    tensors = {
        "subsets": subsets,
        "targets": targets,
        "train_indices": torch.arange(8),
        "test_indices": torch.arange(4),
    }
    write_tensor_file(
        tmp_path / "gt.safetensors",
        tensors,
        {"kind": KIND, "config": CONFIG, "groundtruth_key": groundtruth_key(CONFIG)},
    )
    with caplog.at_level(logging.WARNING, logger="dattri_cli"), pytest.raises(SystemExit) as info:
        cli.main(
            [
                "eval",
                f"scores={tmp_path / 's.safetensors'}",
                f"groundtruth={tmp_path / 'gt.safetensors'}",
                "--json",
                "bootstrap=10",
            ]
        )
    assert info.value.code == 0
    lds = json.loads(capsys.readouterr().out)["lds"]
    assert lds["n_test_used"] == 3 and lds["n_test_dropped"] == 1
    assert "same retrained loss" in lds["dropped_because"]
    assert "LDS over 3 of 4 test samples" in caplog.text


def test_file_split_is_logged_with_unused_rows(tmp_path, caplog):
    np.savez(tmp_path / "d.npz", x=np.ones((50, 2), np.float32), y=np.arange(50) % 2)
    with caplog.at_level(logging.INFO, logger="dattri_cli"):
        split = from_files(tmp_path / "d.npz", n_train=30, n_test=10)
    assert split.x_test.shape[0] == 10
    assert "50 rows -> 30 train + 10 test" in caplog.text and "10 rows unused" in caplog.text
