"""The pipeline end to end on small inputs: files, metadata, reproducibility, BYO, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dattri_cli import pipeline
from dattri_cli.errors import DattriError
from dattri_cli.io import load_scores


def test_default_run_writes_complete_score_file(small_run, tmp_path):
    result = pipeline.run(small_run())
    tensors, meta = load_scores(result.path)
    assert tensors["scores"].shape == (60, 12)
    assert tensors["scores"].dtype == torch.float32
    assert tensors["train_indices"].dtype == torch.int64
    assert len(set(tensors["train_indices"].tolist()) | set(tensors["test_indices"].tolist())) == 72
    assert meta["attributor"]["target"].endswith("TracInAttributor")
    assert meta["config"]["dataset"]["n_train"] == 60
    assert meta["versions"]["torch"] == torch.__version__
    assert len(meta["config_hash"]) == 64
    sidecar = json.loads((tmp_path / "scores.run.json").read_text())
    assert "attribute_s" in sidecar["timings"]


def test_trak_default_works_with_fewer_training_rows_than_projected_dimensions(small_run):
    """60 training rows, 512 projected dimensions: the default ridge keeps the kernel invertible."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # neither singular nor ill-conditioned
        result = pipeline.run(small_run("attributor=trak"))
    assert result.metadata["attributor"]["kwargs"]["regularization"] > 0
    assert bool(torch.isfinite(result.scores).all()) and float(result.scores.abs().max()) > 0


@pytest.mark.parametrize("attributor", ["grad_dot", "if_explicit"])
def test_same_config_twice_gives_identical_bytes(small_run, tmp_path, attributor):
    first = pipeline.run(small_run(f"attributor={attributor}", out="a.safetensors"))
    second = pipeline.run(small_run(f"attributor={attributor}", out="b.safetensors"))
    assert first.scores.numpy().tobytes() == second.scores.numpy().tobytes()
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first.path, second.path)]
    assert digest[0] == digest[1]


def test_ensemble_and_trajectory_checkpoints(small_run):
    ens = pipeline.run(small_run("train.num_models=2", out="ens.safetensors"))
    assert [c["model_index"] for c in ens.metadata["checkpoints"]] == [0, 1]
    traj = pipeline.run(
        small_run(
            "train=trajectory",
            "train.save_every=1",
            "attributor.runner.checkpoints=trajectory",
            "attributor.runner.weights=learning_rates",
            out="traj.safetensors",
        )
    )
    assert [c["epoch"] for c in traj.metadata["checkpoints"]] == [1, 2, 3]


def test_models_and_synthetic_data_run(small_run):
    for model in ("mlp", "cnn"):
        result = pipeline.run(small_run(f"model={model}", out=f"{model}.safetensors"))
        assert torch.isfinite(result.scores).all()
    synth = pipeline.run(small_run("dataset=synthetic", "dataset.n_samples=100", out="syn.safetensors"))
    assert synth.scores.shape == (60, 12)


def test_bring_your_own_checkpoint_and_data(small_run, tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    model = torch.nn.Linear(6, 3)
    save_file({f"linear.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    torch.save({f"linear.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ckpt.pt")
    for ckpt in ("ckpt.safetensors", "ckpt.pt"):
        cfg = small_run(
            "dataset=file",
            f"dataset.path={tmp_path / 'data.npz'}",
            "dataset.n_train=40",
            "dataset.n_test=10",
            f"checkpoint={tmp_path / ckpt}",
            out=f"{ckpt}.out.safetensors",
        )
        result = pipeline.run(cfg)
        assert result.scores.shape == (40, 10)


def test_csv_dataset_with_label_column(small_run, tmp_path):
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(30)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    cfg = small_run(
        "dataset=file", f"dataset.path={tmp_path / 'd.csv'}", "dataset.n_train=20", "dataset.n_test=5"
    )
    assert pipeline.run(cfg).scores.shape == (20, 5)


def _ckpt_with_wrong_shape(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.safetensors"
    save_file(
        {"linear.weight": torch.zeros(3, 3), "linear.bias": torch.zeros(3), "extra": torch.zeros(1)},
        str(path),
    )
    return path


BAD_INPUTS = {
    "n_train too large": (["dataset.n_train=5000"], "fewer than n_train"),
    "missing checkpoint": (["checkpoint=/no/such/file.safetensors"], "checkpoint file not found"),
    "unknown kwarg": (["+attributor.bogus=1"], "unknown option(s) attributor.bogus"),
    "missing data file": (["dataset=file", "dataset.path=/no/data.npz"], "data file not found"),
    "bad runner mode": (["attributor.runner.checkpoints=sometimes"], "runner.checkpoints must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_no_file(small_run, tmp_path, case):
    overrides, message = BAD_INPUTS[case]
    cfg = small_run(*overrides)
    with pytest.raises(DattriError) as info:
        pipeline.run(cfg)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "scores.safetensors").exists()


def test_checkpoint_that_does_not_fit_names_the_keys(small_run, tmp_path):
    cfg = small_run(f"checkpoint={_ckpt_with_wrong_shape(tmp_path)}")
    with pytest.raises(DattriError) as info:
        pipeline.run(cfg)
    text = str(info.value)
    assert "unexpected keys ['extra']" in text
    assert "linear.weight (3, 3) vs model (10, 64)" in text
    assert not (tmp_path / "scores.safetensors").exists()


def test_data_file_without_y_is_refused(small_run, tmp_path):
    save_file({"x": torch.zeros(10, 2)}, str(tmp_path / "noy.safetensors"))
    with pytest.raises(DattriError, match="lacks \\['y'\\]"):
        pipeline.run(small_run("dataset=file", f"dataset.path={tmp_path / 'noy.safetensors'}"))


def test_failed_write_leaves_no_partial_file(small_run, tmp_path, monkeypatch):
    import dattri_cli.io as io

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        pipeline.run(small_run())
    assert not (tmp_path / "scores.safetensors").exists()
    assert not list(tmp_path.glob(".scores*"))
    assert io.SCORES == "scores"


def test_readme_byo_example_runs(tmp_path, cache_dir):
    """The bring-your-own example from the README, as a user would run it."""
    import os
    import shutil
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "byo"
    work = tmp_path / "byo"
    shutil.copytree(example, work)
    env = {**os.environ, "PYTHONPATH": str(work), "DATTRI_CACHE_DIR": str(cache_dir)}
    subprocess.run([sys.executable, "make_files.py"], cwd=work, check=True, env=env, capture_output=True)
    args = [
        "run",
        "model=custom",
        "model._target_=my_model.TinyNet",
        "checkpoint=tiny.safetensors",
        "dataset=file",
        "dataset.path=data.npz",
        "dataset.n_train=200",
        "dataset.n_test=20",
        "attributor=if_explicit",
        "attributor.regularization=0.01",
        "out=byo.safetensors",
    ]
    subprocess.run([shutil.which("dattri"), *args], cwd=work, check=True, env=env, capture_output=True)
    tensors, meta = load_scores(work / "byo.safetensors")
    assert tensors["scores"].shape == (200, 20)
    assert meta["config"]["model"]["_target_"] == "my_model.TinyNet"
