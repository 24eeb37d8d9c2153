"""The attributor YAML files name real classes and real constructor arguments."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from dattri_cli.builders import RUNTIME_ATTRIBUTOR_PARAMS
from dattri_cli.func.projection import make_projector

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "attributor"
RUNTIME = set(RUNTIME_ATTRIBUTOR_PARAMS)


@pytest.mark.parametrize("name", ["tracin", "trak", "rps", "grad_dot", "grad_cos"])
def test_config_matches_constructor(name: str) -> None:
    node = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    module, cls = node["_target_"].rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    kwargs = {k for k in node if not k.startswith("_") and k not in {"runner", "defaults"}}
    assert kwargs <= set(params), kwargs - set(params)
    assert not kwargs & RUNTIME  # filled by the runner, never in YAML
    assert set(params) - kwargs - RUNTIME <= {
        k for k, p in params.items() if p.default is not inspect.Parameter.empty
    }
    assert node["runner"]["checkpoints"] in {"final", "trajectory"}
    assert node["runner"]["weights"] in {"ones", "learning_rates"}
    if node.get("projector_kwargs") is not None:
        make_projector(node["projector_kwargs"])  # every key known, every value valid
