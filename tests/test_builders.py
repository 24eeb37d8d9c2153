"""builders: config -> objects (device, split, checkpoints, task, attributor) and the config hash."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from dattri_cli import builders, catalog
from dattri_cli.algorithm.base import Attributor
from dattri_cli.errors import ConfigError
from dattri_cli.models.train import Checkpoint, TrainSettings
from tests.conftest import compose_run


class NotAnAttributor:
    """Has the dattri-style methods but not the runner's contract."""

    def __init__(self, task: object, device: str = "cpu") -> None:  # noqa: ARG002
        self.task = task

    def cache(self, loader: object) -> None: ...

    def attribute(self, train: object, test: object) -> None: ...


def test_config_hash_ignores_only_the_keys_that_never_change_results():
    cfg = {"seed": 0, "dataset": {"n_train": 5}, **{k: "anything" for k in builders.NON_RESULT_KEYS}}
    assert builders.config_hash(cfg) == builders.config_hash({"seed": 0, "dataset": {"n_train": 5}})
    assert builders.config_hash(cfg) != builders.config_hash({**cfg, "seed": 1})
    assert set(builders.result_config(cfg)) == {"seed", "dataset"}


def test_device_names_are_checked_before_any_work():
    assert builders.check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="is not a device name"):
        builders.check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            builders.check_device("cuda")


def test_checkpoint_choice_and_weights():
    ckpts = [Checkpoint(Path(f"m{m}e{e}"), m, e, 0.1 * (e + 1)) for m in (0, 1) for e in (1, 2)]
    final = builders.select_checkpoints(ckpts, "final")
    assert [(c.model_index, c.epoch) for c in final] == [(0, 2), (1, 2)]
    assert builders.select_checkpoints(ckpts, "trajectory") == ckpts
    assert builders.checkpoint_weights(final, "ones").tolist() == [1.0, 1.0]
    assert torch.allclose(builders.checkpoint_weights(final, "learning_rates"), torch.tensor([0.3, 0.3]))
    with pytest.raises(ConfigError, match="attributor.runner.checkpoints"):
        builders.select_checkpoints(ckpts, "best")
    with pytest.raises(ConfigError, match="attributor.runner.weights"):
        builders.checkpoint_weights(ckpts, "random")


def test_runtime_names_are_what_the_attributor_builder_fills():
    source = inspect.getsource(builders.build_attributor)
    assert all(f'"{name}"' in source for name in builders.RUNTIME_ATTRIBUTOR_PARAMS)
    assert set(builders.RUNTIME_FILLED) == set(builders.RUNTIME_ATTRIBUTOR_PARAMS) | {
        "in_features",
        "num_classes",
    }


def _objects(tmp_path: Path, *overrides: str):
    resolved = builders.to_dict(
        compose_run(
            ["dataset.n_train=30", "dataset.n_test=4", "train.epochs=1", f"cache_dir={tmp_path}", *overrides]
        )
    )
    split = builders.build_split(resolved)
    build_model = builders.model_factory(resolved, split, "cpu")
    settings = TrainSettings(**resolved["train"])
    ckpts = builders.acquire_checkpoints(resolved, build_model, split, settings, 0)
    task = builders.build_task(build_model(), ckpts, settings, split)
    return resolved, split, ckpts, task


@pytest.mark.parametrize("name", catalog.options("attributor"))
def test_every_packaged_attributor_builds_into_the_contract(tmp_path, name):
    resolved, split, ckpts, task = _objects(tmp_path, f"attributor={name}")
    cfg, runner = builders.split_runner(resolved["attributor"])
    attributor = builders.build_attributor(cfg, runner, task, ckpts, split, "cpu")
    assert isinstance(attributor, Attributor)
    assert attributor.splits_over_ranks  # every packaged method runs under torchrun
    assert attributor.feature_store is None and attributor.test_side_memo is None


def test_an_object_without_the_contract_is_refused(tmp_path):
    resolved, split, ckpts, task = _objects(tmp_path)
    cfg = {"_target_": f"{__name__}.NotAnAttributor"}
    with pytest.raises(
        ConfigError, match="must build a dattri_cli.algorithm.base.Attributor, got NotAnAttributor"
    ):
        builders.build_attributor(cfg, {}, task, ckpts, split, "cpu")
