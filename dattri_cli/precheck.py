"""Check `dattri run` overrides before Hydra runs, so mistakes cost one clear line.

Hydra reports an unknown option or a mistyped key over several lines; this check
composes the config first and turns the first problem into one sentence that says
what to do. Custom config directories and Hydra's own flags are left to Hydra.
"""

from __future__ import annotations

import re
from typing import List, Optional

from dattri_cli.catalog import GROUPS

_LEAVE_TO_HYDRA = {"-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "-h", "--help", "--hydra-help", "-i", "--info"}
_MULTIRUN = {"-m", "--multirun"}
_CHOICE = re.compile(rf"^({'|'.join(GROUPS)})=(.*)$")


def _options(group: str) -> List[str]:
    from importlib import resources  # noqa: PLC0415

    root = resources.files("dattri_cli.configs").joinpath(group)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def check_run_args(args: List[str]) -> Optional[str]:
    """The first problem with ``args`` as one line, or None when Hydra should proceed."""
    if any(a.split("=")[0] in _LEAVE_TO_HYDRA for a in args):
        return None
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    for override in overrides:
        match = _CHOICE.match(override)
        if not match:
            continue
        group, value = match.groups()
        available = _options(group)
        for option in value.split(","):
            if option not in available:
                return f"unknown {group} {option!r}; choose one of: {', '.join(available)} (see `dattri list`)"
    if any(a in _MULTIRUN for a in args):
        return None  # sweep syntax (a,b / range()) is Hydra's to parse
    return _compose_problem(overrides)


def _compose_problem(overrides: List[str]) -> Optional[str]:
    from hydra import compose, initialize_config_module  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    try:
        with initialize_config_module(config_module="dattri_cli.configs", version_base="1.3"):
            compose(config_name="run", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(("full_key", "object_type"))]
        return "; ".join(lines[:2]) if lines else type(exc).__name__
    return None
