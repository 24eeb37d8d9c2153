"""Shared fixtures: composing configs and a private checkpoint cache per test session."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig


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
