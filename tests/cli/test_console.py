"""The installed `dattri` console script, run from a directory outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dattri_cli.io import load_scores

REPO = Path(__file__).resolve().parents[2]
FAST = ["dataset.n_train=50", "dataset.n_test=10", "train.epochs=2", "progress=log"]


def dattri(args, cwd, env_extra=None, check=True):
    exe = shutil.which("dattri")
    assert exe, "the dattri console script is not installed (pip install -e .)"
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dattri {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def outside(tmp_path, cache_dir):
    """A working directory outside the repo and a shared checkpoint cache."""
    return tmp_path, {"DATTRI_CACHE_DIR": str(cache_dir)}


def test_help_is_instant_and_lists_commands(tmp_path):
    out = dattri(["--help"], tmp_path).stdout
    assert "run" in out and "list" in out and "examples" in out
    assert "attributor" in dattri(["run", "--help"], tmp_path).stdout


def test_installed_run_writes_identical_files_twice(outside):
    cwd, env = outside
    for name in ("a", "b"):
        dattri(["run", *FAST, f"out={cwd / name}.safetensors"], cwd, env)
    (ta, ma), (tb, _) = load_scores(cwd / "a.safetensors"), load_scores(cwd / "b.safetensors")
    assert ta["scores"].shape == (50, 10)
    assert ta["scores"].numpy().tobytes() == tb["scores"].numpy().tobytes()
    assert (cwd / "a.safetensors").read_bytes() == (cwd / "b.safetensors").read_bytes()
    assert ma["choices"]["attributor"] == "grad_dot" and ma["choices"]["model"] == "lr"


def test_default_output_goes_to_a_readable_run_dir(outside):
    cwd, env = outside
    dattri(["run", *FAST], cwd, env)
    files = list((cwd / "outputs").glob("*/*_grad_dot_digits_lr/scores.safetensors"))
    assert len(files) == 1
    assert (files[0].parent / "scores.run.json").is_file()


def test_multirun_sweep(outside):
    cwd, env = outside
    dattri(["run", "-m", "attributor=grad_dot,grad_cos,if_explicit", *FAST], cwd, env)
    names = sorted(p.parent.name for p in (cwd / "multirun").glob("*/*/*/scores.safetensors"))
    assert names == ["0_grad_dot_digits_lr", "1_grad_cos_digits_lr", "2_if_explicit_digits_lr"]


def test_cfg_job_prints_composed_config(tmp_path):
    out = dattri(["run", "attributor=if_explicit", "--cfg", "job"], tmp_path).stdout
    assert "IFAttributorExplicit" in out and "regularization" in out


def test_python_dash_m_works(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dattri_cli", "--version"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "dattri-cli" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["attributor=nope"], "grad_dot"),
        (["dataset.n_train=5000"], "error: dataset digits has 1797 samples"),
        (["checkpoint=/no/file.pt"], "error: checkpoint file not found"),
    ],
)
def test_errors_are_short_and_write_nothing(outside, args, expected):
    cwd, env = outside
    proc = dattri(["run", *args, f"out={cwd}/x.safetensors"], cwd, env, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cwd / "x.safetensors").exists()


def test_unknown_command(tmp_path):
    proc = dattri(["frobnicate"], tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("dattri_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dattri_cli/configs/run.yaml" in names
    assert "dattri_cli/configs/attributor/grad_dot.yaml" in names
    assert "dattri_cli/configs/hydra/job_logging/rich.yaml" in names


def test_piped_output_results_on_stdout_logs_on_stderr_unwrapped(outside):
    cwd, env = outside
    out = cwd / ("a-rather-long-folder-name-for-the-results-" * 3) / "scores.safetensors"
    proc = dattri(["run", *FAST, f"out={out}"], cwd, {**env, "COLUMNS": "80"})
    wrote = [line for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and str(out) in wrote[0], proc.stdout
    assert "proponents" in proc.stdout and "time:" not in proc.stdout
    assert "time:" in proc.stderr and "wrote" not in proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour codes when piped


def test_piped_log_lines_are_not_padded(outside):
    """A warning logged while stderr is piped is one plain line, not padded to the console width."""
    cwd, env = outside
    proc = dattri(["run", *FAST, "attributor=if_cg", "attributor.max_iter=1", "progress=log"], cwd, env)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING ")]
    assert any("CG: 1 iterations" in line for line in warnings), proc.stderr
    assert all(len(line) < 400 and line == line.rstrip() for line in proc.stderr.splitlines())
