"""dattri_cli.schema: every config composes and validates; bad values, unknown keys and typos are refused."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

from dattri_cli import builders, schema
from dattri_cli.catalog import options
from dattri_cli.errors import ConfigError
from dattri_cli.precheck import check_run_args
from tests.cli.test_configs import ALL
from tests.conftest import compose_run


def _overrides(group: str, option: str) -> List[str]:
    extra = {
        ("dataset", "file"): ["dataset.path=/some/data.npz"],
        ("model", "custom"): ["model._target_=dattri_cli.models.MLP"],
        ("task", "custom"): ["task.loss._target_=tests.cli.custom_task.make_loss"],
        ("dataset", "custom"): ["dataset._target_=tests.cli.test_byo.PairDataset"],
        ("dataset", "hf"): ["dataset.path=/some/table.csv", "dataset.text_column=text"],
    }
    return [f"{group}={option}", *extra.get((group, option), [])]


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple) -> dict:
    return builders.to_dict(compose_run(list(overrides)))


def _resolved(*overrides: str) -> dict:
    """A fresh copy of the resolved config (composed once per set of overrides)."""
    return copy.deepcopy(_composed(overrides))


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_shipped_config_validates_unchanged(group, option):
    cfg = _resolved(*_overrides(group, option))
    before = copy.deepcopy(cfg)
    assert schema.validate_run(cfg, check_paths=False) == before  # valid values are left exactly as given


# one node of every kind: a key added to a YAML file without a rule (or a constructor argument) is refused
NODES = [
    "",
    "train",
    "shard",
    "loader",
    "output",
    "attributor.runner",
    "dataset",
    "model",
    "attributor",
    "task",
]


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
@pytest.mark.parametrize("node", NODES)
def test_key_added_without_schema_is_refused(group, option, node):
    cfg = _resolved(*_overrides(group, option))
    target = cfg
    for part in filter(None, node.split(".")):
        target = target.setdefault(part, {})
    target["new_key_nobody_declared"] = 1
    with pytest.raises(ConfigError, match="new_key_nobody_declared"):
        schema.validate_run(cfg, check_paths=False)


def test_yaml_key_without_schema_in_a_user_config_dir_is_refused(tmp_path):
    shipped = Path(schema.__file__).resolve().parent.parent / "configs" / "train" / "default.yaml"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.yaml").write_text(shipped.read_text() + "warmup_epochs: 3\n")
    problem = check_run_args([f"hydra.searchpath=[file://{tmp_path}]", "train=mine"])
    assert problem and "train.warmup_epochs" in problem


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("true", True),
        ("False", False),
        ("yes", True),
        ("no", False),
        ("ON", True),
        ("off", False),
        ("1", True),
        ("0", False),
        (1, True),
        (0, False),
        (True, True),
        (False, False),
    ],
)
def test_booleans_are_parsed_strictly(word, value):
    assert schema.parse_bool("overwrite", word) is value


@pytest.mark.parametrize("word", ["n", "y", "maybe", "", "2", 2, -1, 0.5, None, [True]])
def test_other_words_are_not_booleans(word):
    with pytest.raises(ConfigError, match=r"overwrite must be a boolean \(true/false, yes/no, on/off, 1/0\)"):
        schema.parse_bool("overwrite", word)


def test_overwrite_word_becomes_a_bool():
    cfg = schema.validate_run(_resolved("overwrite=no", "feature_cache=off"), check_paths=False)
    assert cfg["overwrite"] is False and cfg["feature_cache"] is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=nan", "train.lr must be a finite number in [0, 100], got nan"),
        ("train.lr=inf", "train.lr must be a finite number"),
        ("train.lr=1e30", "got 1e+30"),
        ("train.epochs=2.5", "train.epochs must be an integer >= 1"),
        ("train.epochs=true", "train.epochs must be an integer >= 1, got true"),
        ("seed=-1", "seed must be an integer >= 0, got -1"),
        ("dataset.n_train=150.5", "dataset.n_train must be an integer >= 1 or null, got 150.5"),
        ("dataset.split_seed=abc", "dataset.split_seed must be an integer >= 0"),
        ("output.rows_per_file=many", "output.rows_per_file must be auto or a positive number"),
        ("progress=loud", "progress must be one of off, log, rich, auto"),
        ("device=7", "device must be a non-empty string"),
        ("checkpoint=[1,2]", "checkpoint must be a file path or a list of file paths"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        schema.validate_run(_resolved(override), check_paths=False)
    assert message in str(info.value)


def test_integral_floats_and_ints_for_floats_are_kept_as_given():
    cfg = schema.validate_run(_resolved("train.epochs=3.0", "train.lr=1"), check_paths=False)
    assert cfg["train"]["epochs"] == 3.0 and isinstance(cfg["train"]["lr"], int)  # hashes as before


class FancyAttributor:
    """Stands in for an attributor that gains constructor arguments after this schema was written."""

    def __init__(
        self,
        task: object,
        fancy_ratio: float = 0.5,  # noqa: ARG002
        rounds: int = 3,  # noqa: ARG002
        exact: bool = False,  # noqa: ARG002
        label: Optional[str] = None,  # noqa: ARG002
    ) -> None:
        self.task = task


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fancy_ratio", "abc", "attributor.fancy_ratio must be a finite number, got 'abc'"),
        ("fancy_ratio", float("nan"), "attributor.fancy_ratio must be a finite number, got nan"),
        ("rounds", 1.5, "attributor.rounds must be an integer, got 1.5"),
        ("exact", "maybe", "attributor.exact must be a boolean"),
        ("label", 3, "attributor.label must be a non-empty string or null, got 3"),
        (
            "fancy_ratoi",
            0.1,
            "unknown option(s) attributor.fancy_ratoi (did you mean attributor.fancy_ratio?)",
        ),
        (
            "max_iter",
            0,
            "unknown option(s) attributor.max_iter",
        ),  # a name rule never admits a key the class lacks
    ],
)
def test_attributor_kwargs_follow_the_constructor_read_at_check_time(key, value, message):
    cfg = _resolved()
    cfg["attributor"] = {"_target_": f"{__name__}.FancyAttributor", "_partial_": True, key: value}
    with pytest.raises(ConfigError) as info:
        schema.validate_run(cfg, check_paths=False)
    assert message in str(info.value)


def test_attributor_kwargs_of_a_new_constructor_are_accepted():
    cfg = _resolved()
    cfg["attributor"] = {
        "_target_": f"{__name__}.FancyAttributor",
        "_partial_": True,
        "fancy_ratio": 0.25,
        "rounds": 2,
        "exact": "yes",
        "label": None,
    }
    schema.validate_run(cfg, check_paths=False)
    assert cfg["attributor"]["exact"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["atributor=trak"], "did you mean attributor?"),
        (["+atributor=trak"], "unknown key 'atributor'"),
        (["++sed=3"], "did you mean seed?"),
        (
            ["attributor=grad_dot", "attributor.normalised_grad=true"],
            "did you mean attributor.normalized_grad?",
        ),
        (["dataset=synthtic"], "did you mean synthetic?"),
        (["-m", "attributor=grad_dot,if_cgg"], "unknown attributor 'if_cgg' (did you mean if_cg?)"),
        (["-m", "atributor=grad_dot,if_cg"], "did you mean attributor?"),
    ],
)
def test_typos_get_the_closest_real_key(args, message):
    problem = check_run_args(args)
    assert problem and message in problem, problem


def test_unwritable_cache_dir_is_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        schema.validate_run(_resolved(f"cache_dir={blocker}/cache"))
    with pytest.raises(ConfigError, match="is not writable"):
        schema.validate_run(_resolved("cache_dir=/proc/dattri-cache"))
    schema.validate_run(_resolved(f"cache_dir={tmp_path}/new/cache"))  # created later, its parent is writable
    assert not (tmp_path / "new").exists()


def _user_dataset(root: Path, n_train: int = 50) -> None:
    (root / "dataset").mkdir(parents=True)
    (root / "dataset" / "blobs.yaml").write_text(
        "_target_: dattri_cli.data.synthetic\nn_samples: 120\nn_features: 4\nn_classes: "
        f"3\nn_train: {n_train}\nn_test: 10\n"
    )


def test_user_config_group_option_from_the_search_path(tmp_path):
    _user_dataset(tmp_path)
    assert "blobs" in options("dataset", [f"file://{tmp_path}"])
    assert check_run_args([f"hydra.searchpath=[file://{tmp_path}]", "dataset=blobs"]) is None
    assert check_run_args(["--config-dir", str(tmp_path), "dataset=blobs"]) is None
    problem = check_run_args([f"--config-dir={tmp_path}", "dataset=blobs", "dataset.n_classes=1"])
    assert problem == "dataset.n_classes must be an integer >= 2, got 1"
    assert "unknown dataset 'blobs'" in check_run_args(["dataset=blobs"])


def test_user_config_group_runs_end_to_end(tmp_path, cache_dir):
    _user_dataset(tmp_path / "cfg")
    out = tmp_path / "s.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dattri_cli",
            "run",
            f"hydra.searchpath=[file://{tmp_path / 'cfg'}]",
            "dataset=blobs",
            "train.epochs=1",
            "progress=off",
            f"cache_dir={cache_dir}",
            f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_shell_completion_install_and_query(tmp_path):
    env = {**os.environ, "COMP_LINE": "dattri run attributor=if_c", "COMP_POINT": "26"}
    install = subprocess.run(
        [sys.executable, "-m", "dattri_cli", "run", "-sc", "install=bash"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr
    assert "complete -o nospace -o default -F hydra_bash_completion" in install.stdout
    query = subprocess.run(
        [sys.executable, "-m", "dattri_cli", "-sc", "query=bash"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.split() == ["attributor=if_cg"]


def test_pipeline_validates_before_loading_data(monkeypatch, tmp_path):
    from dattri_cli import builders, pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(builders, "build_split", no_data)
    cfg = compose_run(["loader.train_batch_size=0", f"out={tmp_path}/s.safetensors", "progress=off"])
    with pytest.raises(ConfigError, match="loader.train_batch_size must be an integer >= 1, got 0"):
        pipeline.run(cfg, output_dir=tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["alpha=abc"], "alpha must be a finite number in (0, 1), got 'abc'"),
        (["loo=[a]"], "loo must be a list with each item an integer >= 0, got ['a']"),
        (["loo=x"], "loo must be a list with each item an integer >= 0, got ['x']"),
        (["num_subsets=abc"], "num_subsets must be an integer >= 0, got 'abc'"),
        (["max_jobs=-1"], "max_jobs must be an integer >= 0 or null, got -1"),
    ],
)
def test_groundtruth_settings_are_checked(args, message):
    from dattri_cli.groundtruth import split_args

    with pytest.raises(ConfigError) as info:
        split_args(args)
    assert message in str(info.value)


def test_groundtruth_settings_parse_as_before():
    from dattri_cli.groundtruth import split_args

    settings, overrides, show = split_args(
        ["loo=[0,5]", "alpha=0.3", "work_dir=null", "out=1.safetensors", "model=mlp", "--cfg"]
    )
    assert (
        settings.loo == [0, 5]
        and settings.alpha == 0.3
        and settings.work_dir is None
        and settings.out == "1.safetensors"
    )
    assert overrides == ["model=mlp"] and show


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("bootstrap=abc", "bootstrap must be an integer >= 1, got 'abc'"),
        ("bootstrap=0", "bootstrap must be an integer >= 1, got 0"),
        ("level=5", "level must be a finite number in (0, 1), got 5"),
        ("level=nan", "level must be a finite number in (0, 1), got 'nan'"),
        ("seed=1.5", "seed must be an integer >= 0, got 1.5"),
    ],
)
def test_eval_arguments_are_checked(arg, message):
    from dattri_cli.evaluate import parse_args

    with pytest.raises(ConfigError) as info:
        parse_args(["scores=a.safetensors", "groundtruth=b.safetensors", arg])
    assert message in str(info.value)


def test_eval_paths_are_taken_as_written():
    from dattri_cli.evaluate import parse_args

    opts = parse_args(["scores=1e3", "groundtruth=null", "bootstrap=10", "level=0.9"])
    assert (
        opts["scores"] == "1e3"
        and opts["groundtruth"] == "null"
        and opts["bootstrap"] == 10
        and opts["level"] == 0.9
    )


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g, o in ALL if g not in ("train", "task")],
    ids=[f"{g}={o}" for g, o in ALL if g not in ("train", "task")],
)
def test_shipped_targets_have_resolvable_annotations(group, option):
    """Type checks come from annotations: every constructor argument of a shipped target must have one we can read."""
    node = _resolved(*_overrides(group, option))[group]
    params, _, hints = schema.target_parameters(builders.resolve_target(node, group))
    assert set(params) <= set(hints), set(params) - set(hints)
