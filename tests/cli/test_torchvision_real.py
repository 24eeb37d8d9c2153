"""The torchvision ResNet-18 example with the real torchvision (run by .ci/run in its own venv).

PyPI's torchvision does not import next to the CPU build of torch that the main
environment uses, so this module is skipped there; ``.ci/run`` builds a separate
virtual environment with PyPI's torch 2.14.1 + torchvision 0.29.1 and runs it
(``tests/cli/test_examples.py`` covers the wiring with a stand-in module everywhere).
The example runs with Grad-Dot, TRAK, EK-FAC and DataInf on a ResNet-18 whose ReLUs
are in place (what EK-FAC's tensor hooks must get right).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

try:  # a torchvision built for another torch raises RuntimeError, not ImportError
    import torchvision  # noqa: F401
except Exception:  # noqa: BLE001
    pytest.skip("torchvision does not import here (see .ci/run's torchvision venv)", allow_module_level=True)

from dattri_cli import pipeline
from dattri_cli.io import load_scores
from tests.conftest import REPO, compose_run

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """The example's image folder, written by examples/make_data.py's image writer."""
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("example") / "data"
    module.images(out, 12, np.random.default_rng(0))
    return out / "images"


@pytest.mark.parametrize("attributor", ["grad_dot", "trak", "if_ekfac", "if_datainf"])
def test_resnet18_example_with_real_torchvision(attributor, image_root, cache_dir, tmp_path):
    cfg = compose_run(
        [
            f"hydra.searchpath=[file://{EXAMPLES}]",
            "+experiment=resnet18_images",
            f"dataset.root={image_root}",
            f"attributor={attributor}",
            "train.epochs=1",
            "progress=off",
            f"cache_dir={cache_dir}",
            f"out={tmp_path / 'scores.safetensors'}",
        ]
    )
    result = pipeline.run(cfg)
    tensors, meta = load_scores(result.path)
    scores = tensors["scores"]
    assert tuple(scores.shape) == (28, 8)
    assert bool(torch.isfinite(scores).all()) and float(scores.abs().max()) > 0
    assert (
        meta["config"]["model"]["name"] == "resnet18" and "torchvision" in meta["config"]["model"]["_target_"]
    )
