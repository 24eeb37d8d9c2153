"""The on-disk train-side cache: reused across test sets and attributors, never across inputs, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dattri_cli import pipeline
from dattri_cli.feature_cache import KILL_ENV, BlockStore
from tests.conftest import compose_run

ROOT = Path(__file__).resolve().parents[2]


def _counts(result):
    return result.timings["feature_cache_hits"], result.timings["feature_cache_misses"]


def test_reused_by_other_test_set_and_attributor_never_across_models(small_run):
    first = pipeline.run(small_run("attributor=grad_dot", "seed=11", out="a.safetensors"))
    assert _counts(first)[1] > 0
    other_test = pipeline.run(
        small_run("attributor=grad_dot", "seed=11", "dataset.n_test=7", out="b.safetensors")
    )
    assert _counts(other_test) == (4, 0)  # 60 rows in 4 batches, all found
    assert torch.allclose(other_test.scores, first.scores[:, :7], rtol=1e-5, atol=1e-7)
    cg = pipeline.run(
        small_run("attributor=if_cg", "attributor.regularization=0.01", "seed=11", out="c.safetensors")
    )
    # IF calls the loss on batches of one, Grad-Dot on bare samples (dattri's conventions): not shared
    assert _counts(cg)[0] == 0
    cg_again = pipeline.run(
        small_run("attributor=if_cg", "attributor.regularization=0.01", "seed=11", out="c2.safetensors")
    )
    assert _counts(cg_again)[1] == 0
    cold = pipeline.run(
        small_run(
            "attributor=if_cg",
            "attributor.regularization=0.01",
            "seed=11",
            "feature_cache=false",
            out="d.safetensors",
        )
    )
    assert cold.path.read_bytes() == cg.path.read_bytes() == cg_again.path.read_bytes()
    other_model = pipeline.run(small_run("attributor=grad_dot", "seed=12", out="e.safetensors"))
    assert _counts(other_model) == (0, 4)  # another checkpoint: another key


def test_store_refuses_blocks_of_another_key(tmp_path):
    store = BlockStore(tmp_path / "s", {"checkpoint": "a"})
    store.put("r0-1", torch.ones(1, 2))
    assert BlockStore(tmp_path / "s", {"checkpoint": "a"}).get("r0-1") is not None
    assert BlockStore(tmp_path / "s", {"checkpoint": "b"}).get("r0-1") is None


def _cli_args(cache: Path, out: Path, tmp: Path):
    return [
        "attributor=trak",
        "attributor.projector_kwargs.proj_dim=16",
        "dataset.n_train=60",
        "dataset.n_test=12",
        "train.epochs=3",
        "loader.train_batch_size=8",
        "progress=off",
        f"cache_dir={cache}",
        f"out={out}",
        f"hydra.run.dir={tmp / 'hydra'}",
    ]


def test_sigkill_mid_run_resumes_to_identical_bytes(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{KILL_ENV: "3"})
    killed = subprocess.run(
        [sys.executable, "-m", "dattri_cli", "run", *_cli_args(cache, tmp_path / "k.safetensors", tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "k.safetensors").exists()
    blocks = list((cache / "features").rglob("r*.safetensors"))
    assert len(blocks) == 3  # completed blocks only: temporary files never survive a rename
    resumed = pipeline.run(compose_run(_cli_args(cache, tmp_path / "k.safetensors", tmp_path)[:-1]))
    assert _counts(resumed) == (3, 5)  # 60 rows in 8 batches: 3 found, 5 computed
    fresh = pipeline.run(
        compose_run(_cli_args(cache, tmp_path / "f.safetensors", tmp_path)[:-1] + ["feature_cache=false"])
    )
    assert resumed.path.read_bytes() == fresh.path.read_bytes()
    sidecar = json.loads((tmp_path / "k.run.json").read_text())
    assert sidecar["timings"]["feature_cache_hits"] == 3


@pytest.mark.parametrize(
    ("attributor", "changed"),
    [
        ("if_explicit", "attributor.regularization=0.5"),  # the Hessian is reused, its damping is not cached
        ("if_arnoldi", "dataset.n_test=7"),  # the eigenpairs are reused by another test set
    ],
)
def test_influence_factors_are_reused_and_change_nothing(small_run, attributor, changed):
    plain = pipeline.run(
        small_run(
            f"attributor={attributor}",
            "feature_cache=false",
            "attributor.regularization=0.1",
            out="plain.safetensors",
        )
    )
    first = pipeline.run(
        small_run(
            f"attributor={attributor}",
            "feature_cache=true",
            "attributor.regularization=0.1",
            out="first.safetensors",
        )
    )
    again = pipeline.run(
        small_run(
            f"attributor={attributor}",
            "feature_cache=true",
            "attributor.regularization=0.1",
            out="again.safetensors",
        )
    )
    # (the session's cache may already hold these factors from earlier tests: no claim on `first`)
    assert again.timings["feature_cache_misses"] == 0 and again.timings["feature_cache_hits"] >= 1
    assert plain.scores.numpy().tobytes() == first.scores.numpy().tobytes() == again.scores.numpy().tobytes()
    assert again.metadata["diagnostics"] == plain.metadata["diagnostics"]
    other = pipeline.run(
        small_run(
            f"attributor={attributor}",
            "feature_cache=true",
            "attributor.regularization=0.1",
            changed,
            out="other.safetensors",
        )
    )
    if attributor == "if_explicit":
        assert other.timings["feature_cache_hits"] >= 1  # regularization is applied after the cached Hessian
    else:
        assert other.timings["feature_cache_misses"] == 0
