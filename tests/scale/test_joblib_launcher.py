"""`dattri run -m hydra/launcher=joblib` sweeps in parallel (only where the optional plugin is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_joblib_launcher_sweep(cache_dir, tmp_path):
    args = [
        sys.executable,
        "-m",
        "dattri_cli",
        "run",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "attributor=grad_dot,grad_cos",
        "dataset.n_train=40",
        "dataset.n_test=5",
        "train.epochs=2",
        "progress=off",
        f"cache_dir={cache_dir}",
        f"hydra.sweep.dir={tmp_path}",
    ]
    done = subprocess.run(
        args,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.rglob("scores.safetensors"))) == 2
