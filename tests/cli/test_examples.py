"""The four examples (examples/experiment/*.yaml) end to end at tiny sizes, and user config groups.

Each example is composed as the command line composes it (``--config-dir examples
+experiment=NAME``) over data written by ``examples/make_data.py``, and run with
Grad-Dot, TRAK, EK-FAC and DataInf; the scores must be finite, of the example's
``(n_train, n_test)`` shape, and not all zero. One case per example runs in the
default suite, the others are ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from dattri_cli import pipeline
from dattri_cli.io import load_scores
from tests.conftest import REPO, compose_run

EXAMPLES = REPO / "examples"
SHAPES = {"images": (28, 8), "bert_text": (40, 8), "gpt2_lm": (40, 8), "regression_mlp": (60, 10)}
FAST = {
    ("regression_mlp", "grad_dot"),
    ("images", "trak"),
    ("bert_text", "grad_dot"),
    ("gpt2_lm", "if_datainf"),
}


def _cases():
    for name in SHAPES:
        for attributor in ("grad_dot", "trak", "if_ekfac", "if_datainf"):
            marks = []
            if (name, attributor) not in FAST:
                marks.append(pytest.mark.slow)
            yield pytest.param(name, attributor, marks=marks, id=f"{name}-{attributor}")


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    """The examples' data, written once by examples/make_data.py."""
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("example") / "data"
    module.main(out)
    return out


@pytest.fixture
def in_example_dir(example_data, tmp_path):
    """The working directory holds examples/data (the paths the example configs use)."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "data").symlink_to(example_data)
    return tmp_path


def example_config(name, *overrides, cache_dir, out):
    return compose_run(
        [
            f"hydra.searchpath=[file://{EXAMPLES}]",
            f"+experiment={name}",
            "progress=off",
            f"cache_dir={cache_dir}",
            f"out={out}",
            *overrides,
        ]
    )


@pytest.mark.parametrize(("name", "attributor"), list(_cases()))
def test_example_runs(name, attributor, in_example_dir, cache_dir):
    cfg = example_config(
        name, f"attributor={attributor}", cache_dir=cache_dir, out=in_example_dir / "scores.safetensors"
    )
    result = pipeline.run(cfg)
    tensors, meta = load_scores(result.path)
    scores = tensors["scores"]
    assert tuple(scores.shape) == SHAPES[name]
    assert bool(torch.isfinite(scores).all()) and float(scores.abs().max()) > 0
    assert meta["loss"]["task"] == (
        "regression" if name == "regression_mlp" else meta["config"]["task"]["name"]
    )
    assert (
        meta["loss"]["weight_decay"] == meta["config"]["train"]["weight_decay"]
    )  # trained here: the L2 term


def test_user_config_group_in_config_dir_composes_with_ours(in_example_dir, cache_dir):
    """A user's dataset/my_houses.yaml, in a folder passed with --config-dir, next to our groups."""
    mine = in_example_dir / "my_configs" / "dataset"
    mine.mkdir(parents=True)
    (mine / "my_houses.yaml").write_text(
        "_target_: dattri_cli.data.from_files\n"
        "path: examples/data/tabular/houses.csv\n"
        "label_column: price\n"
        "n_train: 30\n"
        "n_test: 6\n"
    )
    env = {**os.environ, "DATTRI_CACHE_DIR": str(cache_dir)}
    dattri = shutil.which("dattri", path=str(Path(sys.executable).parent)) or shutil.which("dattri")
    args = [
        dattri,
        "run",
        "--config-dir",
        str(mine.parent),
        "dataset=my_houses",
        "task=regression",
        "model=mlp",
        "model.hidden=[8]",
        "train.epochs=2",
        "progress=off",
        "out=mine.safetensors",
    ]
    done = subprocess.run(args, cwd=in_example_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tensors, meta = load_scores(in_example_dir / "mine.safetensors")
    assert tensors["scores"].shape == (30, 6)
    assert meta["choices"]["dataset"] == "my_houses" and meta["choices"]["task"] == "regression"


class _TinyResNet(nn.Module):
    """Stands in for torchvision's resnet18: a convolution, pooling and an ``fc`` head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv1(x))).flatten(1))


def test_resnet18_example_through_a_stand_in_torchvision(in_example_dir, cache_dir, monkeypatch):
    """model=torchvision's wiring (import, builder lookup, weights=None, classes from the folders) runs the example.

    torchvision itself does not import next to the CPU build of torch here, so a fake
    ``torchvision.models`` records how the builder is called.
    """
    calls = []

    def resnet18(weights=None, num_classes=1000, **kwargs):
        calls.append({"weights": weights, "num_classes": num_classes, **kwargs})
        return _TinyResNet(num_classes)

    fake = types.ModuleType("torchvision")
    fake.models = types.ModuleType("torchvision.models")
    fake.models.resnet18 = resnet18
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    cfg = example_config(
        "resnet18_images",
        "train.epochs=1",
        cache_dir=cache_dir,
        out=in_example_dir / "resnet.safetensors",
    )
    result = pipeline.run(cfg)
    assert calls and all(c == {"weights": None, "num_classes": 3} for c in calls)
    assert tuple(result.scores.shape) == (28, 8) and bool(torch.isfinite(result.scores).all())


def test_hf_model_folder_is_the_checkpoint_and_is_hashed_by_its_files(in_example_dir, cache_dir):
    """model=hf model.path=DIR: the folder's weights are attributed (no training), its files hashed."""
    from dattri_cli.hashing import tree_sha256
    from dattri_cli.models.hf import hf_model

    config = dict(example_config("bert_text", cache_dir=cache_dir, out="x").model.config)
    folder = in_example_dir / "tiny-bert"
    torch.manual_seed(0)
    hf_model(config=config, num_classes=2).save_pretrained(str(folder))
    cfg = example_config(
        "bert_text",
        "model.config=null",
        f"model.path={folder}",
        "train.epochs=1000",  # would take minutes if it trained
        cache_dir=cache_dir,
        out=in_example_dir / "dir.safetensors",
    )
    result = pipeline.run(cfg)
    assert result.metadata["checkpoints"][0]["sha256"] == tree_sha256(folder)
    assert result.metadata["loss"]["weight_decay"] == 0.0  # your weights: the plain loss
    assert tuple(result.scores.shape) == (40, 8) and bool(torch.isfinite(result.scores).all())
    before = tree_sha256(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert tree_sha256(folder) != before


def test_torchvision_that_does_not_import_is_one_line_naming_the_extra(monkeypatch):
    from dattri_cli.errors import ConfigError
    from dattri_cli.models.vision import torchvision_model

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ConfigError, match=r"dattri-cli\[vision\]") as info:
        torchvision_model("resnet18", num_classes=3)
    assert "\n" not in str(info.value)


def test_torchvision_builder_refuses_downloads_and_unknown_names(monkeypatch):
    from dattri_cli.errors import ConfigError
    from dattri_cli.models.vision import torchvision_model

    fake = types.ModuleType("torchvision")
    fake.models = types.ModuleType("torchvision.models")
    fake.models.resnet18 = lambda weights=None, num_classes=1000: _TinyResNet(num_classes)  # noqa: ARG005
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    model = torchvision_model("resnet18", num_classes=4)
    assert model.fc.out_features == 4 and model.final_layer == "fc"
    with pytest.raises(ConfigError, match="never downloaded"):
        torchvision_model("resnet18", kwargs={"weights": "IMAGENET1K_V1"})
    with pytest.raises(ConfigError, match="not a torchvision.models builder"):
        torchvision_model("resnet1000")


def test_shards_of_a_lazy_split_equal_the_full_run(in_example_dir, cache_dir):
    """Row blocks of an image-folder split (runner.row_loader through data.protocol) give the full run's rows."""
    full = pipeline.run(
        example_config("images", cache_dir=cache_dir, out=in_example_dir / "full.safetensors")
    )
    parts = [
        pipeline.run(
            example_config(
                "images",
                "shard.count=2",
                f"shard.index={i}",
                cache_dir=cache_dir,
                out=in_example_dir / "s.safetensors",
            )
        ).scores
        for i in range(2)
    ]
    assert torch.equal(torch.cat(parts), full.scores)
