"""Turn config nodes into objects. The only module that calls ``hydra.utils.instantiate``.

Config nodes carry ``_target_`` plus constructor kwargs. Values only known at run
time (the task, the device, TracIn weights, TRAK's probability function, RPS's
layer name, a model's input size) are filled here by parameter name, and only
when the config leaves them unset.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Tuple

from omegaconf import DictConfig, OmegaConf

from dattri_cli.errors import ConfigError, DattriError

RUNNER_KEY = "runner"
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def to_dict(node: Any) -> Dict[str, Any]:
    """A resolved plain-Python copy of a config node."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def resolve_target(node: Mapping[str, Any], where: str) -> Callable:
    """Import the ``_target_`` of ``node``, with an error that names the config key."""
    from hydra.utils import get_object  # noqa: PLC0415

    target = node.get("_target_")
    if not target:
        msg = f"{where} has no _target_; name the class or function to build"
        raise ConfigError(msg)
    try:
        return get_object(target)
    except Exception as exc:  # noqa: BLE001 - import errors of user code vary
        msg = (
            f"{where}._target_={target} cannot be imported ({exc}); check the dotted path and that "
            "its package is installed"
        )
        raise ConfigError(msg) from exc


def _accepted(func: Callable) -> Tuple[Dict[str, inspect.Parameter], bool]:
    params = dict(inspect.signature(func).parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return params, takes_any


def split_runner(node: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Separate the ``runner`` block (how to run) from constructor kwargs."""
    data = to_dict(node)
    runner = data.pop(RUNNER_KEY, None) or {}
    return data, runner


def check_kwargs(node: Mapping[str, Any], where: str) -> Dict[str, inspect.Parameter]:
    """Refuse kwargs the target does not take; return the target's parameters."""
    target = resolve_target(node, where)
    params, takes_any = _accepted(target)
    unknown = [k for k in node if k not in _HYDRA_KEYS and k not in params]
    if unknown and not takes_any:
        msg = (
            f"unknown option(s) {', '.join(where + '.' + k for k in unknown)} for {node['_target_']}; "
            f"accepted: {', '.join(params)}"
        )
        raise ConfigError(msg)
    return params


def build(node: Mapping[str, Any], where: str, runtime: Mapping[str, Any] | None = None) -> Any:
    """Instantiate ``node``, filling parameters it leaves unset (or null) from ``runtime``."""
    from hydra.utils import instantiate  # noqa: PLC0415

    node = dict(node)
    params = check_kwargs(node, where)
    extra = {}
    for name, value in (runtime or {}).items():
        if name in params and node.get(name) is None:
            node.pop(name, None)
            extra[name] = value
    node.pop("_partial_", None)
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and name not in node
        and name not in extra
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if missing:
        msg = f"{where} needs a value for {', '.join(where + '.' + m for m in missing)} ({node['_target_']})"
        raise ConfigError(msg)
    node["_convert_"] = "all"
    try:
        return instantiate(node, **extra)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, DattriError):
            raise cause from exc
        if isinstance(cause, (TypeError, ValueError)):
            msg = f"cannot build {where} ({node['_target_']}): {cause}"
            raise ConfigError(msg) from exc
        raise
