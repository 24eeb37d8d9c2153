"""Every option of every config group composes, and every _target_ binds to its signature."""

from __future__ import annotations

import inspect

import pytest

from dattri_cli import builders
from dattri_cli.catalog import GROUPS, options
from tests.conftest import compose_run

RUNTIME_FILLED = set(builders.RUNTIME_FILLED)
CUSTOM_LOSS = "tests.cli.custom_task.make_loss"
CUSTOM_DATASET = "tests.cli.test_byo.PairDataset"


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)
    assert "grad_dot" in options("attributor") and "if_explicit" in options("attributor")


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_binds(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("dataset", "file"):
        overrides.append("dataset.path=/some/data.npz")
    if (group, option) == ("model", "custom"):
        overrides.append("model._target_=dattri_cli.models.MLP")
    if (group, option) == ("task", "custom"):
        overrides.append(f"task.loss._target_={CUSTOM_LOSS}")
    if (group, option) == ("dataset", "hf"):
        overrides.append("dataset.path=/some/table.csv")
    if (group, option) == ("dataset", "custom"):
        overrides.append(f"dataset._target_={CUSTOM_DATASET}")
    cfg = compose_run(overrides)
    node = builders.to_dict(cfg)[group]
    if group == "task":  # no _target_: the name picks the loss; every key is read by make_task_functions
        from dattri_cli import schema
        from dattri_cli.models import LogisticRegression

        schema.TOP["task"].check("task", node)
        functions = builders.make_task_functions(node, LogisticRegression(3, 2), 1, 0.0)
        assert functions.name == (node["name"])
        return
    if group == "train":
        from dattri_cli.models.train import TrainSettings

        TrainSettings(**node)  # every key is a training setting
        return
    node, runner = builders.split_runner(node)
    if group == "dataset":  # read by the pipeline (label noise), not passed to the builder
        from dattri_cli.data.noise import NOISE_KEYS

        assert all(node.pop(k) is not None for k in NOISE_KEYS)
        node.pop("collate_fn", None)  # read by the pipeline for a _target_ returning a torch Dataset
        params, takes_any = builders._accepted(builders.resolve_target(node, group))
        for key in builders.DATASET_SPLIT_KEYS:  # applied by the pipeline when the builder does not take them
            if key not in params and not takes_any:
                node.pop(key, None)
    params = builders.check_kwargs(node, group)
    target = builders.resolve_target(node, group)
    given = {k for k in node if not k.startswith("_")}
    required = {
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    assert required <= given | RUNTIME_FILLED, f"{target} needs {required - given - RUNTIME_FILLED}"
    if group == "attributor":
        assert node.get("_partial_") is True
        assert set(runner) <= {"checkpoints", "weights"}


def test_unknown_choice_is_refused_with_choices_listed():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_run(["attributor=does_not_exist"])
    assert "grad_dot" in str(info.value)


def test_every_option_describes_itself():
    from dattri_cli.catalog import catalog

    for group, entries in catalog().items():
        for name, info in entries.items():
            about = info["about"]
            assert about and not about.startswith("configs/") and f"{name}.yaml" not in about, (
                group,
                name,
                about,
            )
