"""`dattri compare` treats NaN scores in the same place as equal, and says where they are."""

from __future__ import annotations

import json

import pytest
import torch

from dattri_cli import cli
from dattri_cli.io import save_scores


def _write(path, scores):
    save_scores(
        path, scores, torch.arange(scores.shape[0]), torch.arange(scores.shape[1]), {"config_hash": "x"}
    )
    return path


def _compare(capsys, *args):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", *map(str, args), "--json"])
    return info.value.code, json.loads(capsys.readouterr().out)


def test_a_file_with_nan_equals_itself(tmp_path, capsys):
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    scores[2, 1] = float("nan")
    path = _write(tmp_path / "a.safetensors", scores)
    code, stats = _compare(capsys, path, path, "--exact")
    assert code == 0 and stats["identical"] and stats["failures"] == []
    assert stats["nan_a"] == {"count": 1, "first": [[2, 1]]}
    assert stats["pearson"] == pytest.approx(1.0)


def test_nan_in_one_file_only_is_reported_with_its_place(tmp_path, capsys):
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    a = _write(tmp_path / "a.safetensors", scores)
    scores[4, 3] = float("nan")
    b = _write(tmp_path / "b.safetensors", scores)
    code, stats = _compare(capsys, a, b, "--exact")
    assert code == 1 and not stats["identical"]
    assert any("B has 1 (first at row 4 column 3)" in f for f in stats["failures"]), stats["failures"]


def test_exact_still_fails_on_a_real_difference_next_to_nans(tmp_path, capsys):
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    scores[0, 0] = float("nan")
    a = _write(tmp_path / "a.safetensors", scores)
    scores[5, 2] += 1e-3
    b = _write(tmp_path / "b.safetensors", scores)
    code, stats = _compare(capsys, a, b, "--exact")
    assert code == 1 and any(f.startswith("--exact: scores differ") for f in stats["failures"])
