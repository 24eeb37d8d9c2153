"""Check `dattri run` (and `dattri groundtruth`) overrides before Hydra runs, so mistakes cost one clear line.

Hydra reports an unknown option or a mistyped key over several lines; this check
looks at the override keys first (unknown top-level keys are refused with the
closest real key as a hint, ``+`` or not), composes the config like Hydra will
(user config directories from ``--config-dir`` and ``hydra.searchpath`` included)
and validates it against :mod:`dattri_cli.schema`. Hydra's own flags (help, info,
shell completion, another primary config) are left to Hydra; the pipeline then
validates the composed config with the same schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from dattri_cli import catalog
from dattri_cli.errors import ConfigError
from dattri_cli.schema import GROUPS, OPTIONAL_GROUPS, TOP_KEYS, closest, validate_run, yaml_value

_LEAVE_TO_HYDRA = {
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-h",
    "--help",
    "--hydra-help",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
}
_CONFIG_DIR = {"-cd", "--config-dir"}
#: a user config group of whole-run presets (``# @package _global_``): ``--config-dir DIR +experiment=NAME``
EXPERIMENT_GROUP = "experiment"
_WITH_VALUE = {"-c", "--cfg", "-p", "--package"} | _CONFIG_DIR
_SHOW_ONLY = {"-c", "--cfg", "-p", "--package", "--resolve"}
_MULTIRUN = {"-m", "--multirun"}
_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def parse_args(args: Sequence[str]) -> Tuple[List[str], List[str], set]:
    """``(overrides, config_dirs, flags)`` of a Hydra command line."""
    overrides: List[str] = []
    dirs: List[str] = []
    flags = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            name, sep, value = arg.partition("=")
            flags.add(name)
            if name in _WITH_VALUE and not sep and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            if name in _CONFIG_DIR and value:
                dirs.append(value)
        else:
            overrides.append(arg)
        i += 1
    return overrides, dirs, flags


def _split_override(override: str) -> Tuple[str, str, str]:
    """``(prefix, key, value)`` of ``+key=value`` / ``++key=value`` / ``~key`` / ``key=value``."""
    prefix = ""
    for p in ("++", "+", "~"):
        if override.startswith(p):
            prefix, override = p, override[len(p) :]
            break
    key, _, value = override.partition("=")
    return prefix, key, value


def search_path(overrides: Sequence[str], config_dirs: Sequence[str]) -> List[str]:
    """Extra config search path entries: ``hydra.searchpath=[...]`` and ``--config-dir`` dirs."""
    entries: List[str] = []
    for override in overrides:
        _, key, value = _split_override(override)
        if key == "hydra.searchpath":
            parsed = yaml_value(value)
            entries += [str(v) for v in (parsed if isinstance(parsed, list) else [parsed]) if v]
    entries += [f"file://{Path(d).expanduser().resolve()}" for d in config_dirs]
    return entries


def check_keys(overrides: Sequence[str], extra_path: Sequence[str] = (), sweep: bool = False) -> None:
    """Refuse unknown top-level keys (``+`` or not) and unknown group options, with hints."""
    for override in overrides:
        prefix, key, value = _split_override(override)
        head = re.split(r"[./@]", key, maxsplit=1)[0]
        if head == "hydra" or not key:
            continue
        if key == EXPERIMENT_GROUP and prefix in ("+", "++") and not sweep:
            available = catalog.options(key, extra_path)
            if value not in available:
                where = "your config dirs" if extra_path else "no --config-dir / hydra.searchpath given"
                msg = (
                    f"unknown experiment {value!r} ({where}); choose one of: {', '.join(available) or 'none'}"
                )
                raise ConfigError(msg)
            continue
        if head not in TOP_KEYS:
            best = closest(head, TOP_KEYS)
            hint = f"did you mean {best}?" if best else "see `dattri run --cfg job` for the keys"
            msg = f"unknown key {head!r} in {override!r}; {hint} (top-level keys: {', '.join(TOP_KEYS)})"
            raise ConfigError(msg)
        if key in GROUPS + OPTIONAL_GROUPS and prefix != "~":
            available = catalog.options(key, extra_path)
            options = value.split(",") if sweep else [value]
            for option in options:
                if option not in available:
                    hint = closest(option, available)
                    said = f" (did you mean {hint}?)" if hint else ""
                    msg = f"unknown {key} {option!r}{said}; choose one of: {', '.join(available)} (see `dattri list`)"
                    raise ConfigError(msg)


def _with_search_path(overrides: Sequence[str], extra_path: Sequence[str]) -> List[str]:
    kept = [o for o in overrides if _split_override(o)[1] != "hydra.searchpath"]
    if extra_path:
        kept.append("hydra.searchpath=[" + ",".join(extra_path) + "]")
    return kept


def _compose(overrides: Sequence[str]) -> Any:
    from hydra import compose, initialize_config_module  # noqa: PLC0415

    with initialize_config_module(config_module="dattri_cli.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


def _missing_key_hint(key: str, overrides: Sequence[str]) -> str:
    """``key`` does not exist: name the closest key at the level where it goes astray."""
    from omegaconf import DictConfig  # noqa: PLC0415

    choices = [
        o
        for o in overrides
        if _split_override(o)[1] in GROUPS + OPTIONAL_GROUPS or _split_override(o)[1] == "hydra.searchpath"
    ]
    try:
        node: Any = _compose(choices)
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(parts[:depth])
            best = closest(part, list(node.keys())) if isinstance(node, DictConfig) else None
            if best:
                return f"; did you mean {(where + '.' if where else '') + best}?"
            keys = ", ".join(str(k) for k in node) if isinstance(node, DictConfig) else ""
            return f"; {where or 'the config'} has no key {part!r} (its keys: {keys or 'none'})"
        node = node[part]
    return ""


def compose_checked(overrides: Sequence[str], config_dirs: Sequence[str] = (), validate: bool = True) -> Any:
    """Compose the run config like the command line does and validate it; ConfigError on the first problem."""
    from hydra.errors import HydraException  # noqa: PLC0415
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    from dattri_cli import builders  # noqa: PLC0415

    extra_path = search_path(overrides, config_dirs)
    check_keys(overrides, extra_path)
    overrides = _with_search_path(overrides, extra_path)
    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc)
        match = _COULD_NOT_OVERRIDE.search(text)
        if match:
            msg = f"Could not override '{match.group(1)}': no such key{_missing_key_hint(match.group(1), overrides)}"
            raise ConfigError(msg) from exc
        lines = [
            ln.strip()
            for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("full_key", "object_type"))
        ]
        raise ConfigError("; ".join(lines[:2]) if lines else type(exc).__name__) from exc
    if validate:
        try:
            resolved = builders.to_dict(cfg)
        except OmegaConfBaseException as exc:
            msg = f"the config does not resolve: {str(exc).splitlines()[0]}"
            raise ConfigError(msg) from exc
        validate_run(resolved)
    return cfg


def check_run_args(args: List[str]) -> Optional[str]:
    """The first problem with ``args`` as one line, or None when Hydra should proceed."""
    overrides, config_dirs, flags = parse_args(args)
    if flags & _LEAVE_TO_HYDRA:
        return None
    try:
        if flags & _MULTIRUN:  # sweep syntax (a,b / range()) is Hydra's to parse; each job is validated
            check_keys(overrides, search_path(overrides, config_dirs), sweep=True)
            return None
        compose_checked(overrides, config_dirs, validate=not flags & _SHOW_ONLY)
    except ConfigError as exc:
        return str(exc)
    return None
