"""Shared fixtures: composing configs and a private checkpoint cache per test session."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own scratch directory: Hydra run dirs (``outputs/``) and other
    relative paths land there, never in the working tree."""
    monkeypatch.chdir(tmp_path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:  # noqa: ARG001
    """Fail loudly if a test wrote run folders into the repository."""
    leaked = [
        name for name in ("outputs", "multirun") if (REPO / name).exists() and name not in _PRESENT_AT_START
    ]
    if leaked:
        session.exitstatus = 1
        print(f"\ntests left {', '.join(leaked)} in {REPO}")


_PRESENT_AT_START = {name for name in ("outputs", "multirun") if (REPO / name).exists()}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint cache for the whole session, so tiny models train once."""
    return tmp_path_factory.mktemp("dattri-cache")


def compose_run(overrides: List[str]) -> DictConfig:
    """The `dattri run` config with overrides, composed like the command line does."""
    with initialize_config_module(config_module="dattri_cli.configs", version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


@pytest.fixture
def small_run(cache_dir: Path, tmp_path: Path):
    """Compose a fast config (small split, few epochs) writing into ``tmp_path``."""

    def make(*overrides: str, out: str = "scores.safetensors") -> DictConfig:
        base = [
            "dataset.n_train=60",
            "dataset.n_test=12",
            "train.epochs=3",
            "loader.train_batch_size=16",
            "loader.test_batch_size=5",
            "progress=off",
            f"cache_dir={cache_dir}",
            f"out={tmp_path / out}",
        ]
        return compose_run(base + list(overrides))

    return make
