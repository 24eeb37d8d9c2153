"""The typed schema of every config value, checked in one place before any work.

``dattri run``, ``dattri groundtruth`` and ``dattri eval`` all call :func:`validate_run`
(the composed run config) or :func:`validate_settings` (their own ``KEY=VALUE``
settings) before any data is loaded. A bad value gives one :class:`ConfigError`
naming the key, the value and what is allowed.

Where the schema comes from:

* fixed nodes (the top-level keys, ``train``, ``shard``, ``loader``, ``output``,
  ``attributor.runner``) are tables below; a key a YAML file adds without a rule
  here is refused, so the schema cannot drift from the configs;
* ``dataset``, ``model`` and ``attributor`` nodes are checked against the signature
  of the ``_target_`` the composed config names (read when the check runs, so new
  constructor arguments are picked up): unknown keys are refused, values are
  checked against the annotated types, and well-known names (``max_iter``,
  ``n_train``, ``hidden`` ...) carry ranges from the ``*_RULES`` tables.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from dattri_cli.errors import ConfigError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
# filled at run time (task, device, data shape ...) when the config leaves them null
MAX_ABS = 1e6  # "sane" magnitude for unbounded floats (learning rates, regularization ...)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def closest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate most like ``word`` (a typo hint), or None when none is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _hint(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    best = closest(word, candidates)
    return f" (did you mean {prefix}{best}?)" if best else ""


# ------------------------------------------------------------------ value rules


class Rule:
    """Checks one value; ``check`` returns it (a bool given as a word becomes a bool)."""

    nullable = False

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        raise NotImplementedError

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        ok, out = self.accepts(value)
        if not ok:
            allowed = self.describe() + (" or null" if self.nullable else "")
            msg = f"{key} must be {allowed}, got {_show(value)}"
            raise ConfigError(msg)
        return out


class Int(Rule):
    def __init__(self, low: Optional[int] = None, high: Optional[int] = None, nullable: bool = False) -> None:
        self.low, self.high, self.nullable = low, high, nullable

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an integer in {self.low}..{self.high}"
        if self.low is not None:
            return f"an integer >= {self.low}"
        return "an integer"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return False, value
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return False, value
        return True, value


class Float(Rule):
    """A finite number in a range; ``open_low``/``open_high`` exclude the bound."""

    def __init__(
        self,
        low: Optional[float] = None,
        high: Optional[float] = None,
        open_low: bool = False,
        open_high: bool = False,
        nullable: bool = False,
    ) -> None:
        self.low, self.high, self.open_low, self.open_high, self.nullable = (
            low,
            high,
            open_low,
            open_high,
            nullable,
        )

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "a finite number"
        left = "(" if self.open_low else "["
        right = ")" if self.open_high else "]"
        low = "-inf" if self.low is None else _fmt_num(self.low)
        high = "inf" if self.high is None else _fmt_num(self.high)
        return f"a finite number in {left}{low}, {high}{right}"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False, value
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            return False, value
        return True, value


class Bool(Rule):
    """true/false, and the words yes/no, on/off, 1/0 (any case); nothing else."""

    def __init__(self, nullable: bool = False) -> None:
        self.nullable = nullable

    def describe(self) -> str:
        return "a boolean (true/false, yes/no, on/off, 1/0)"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in TRUE_WORDS:
                return True, True
            if word in FALSE_WORDS:
                return True, False
        return False, value


def parse_bool(key: str, value: Any) -> bool:
    """``value`` as a bool, strictly (see :class:`Bool`)."""
    return Bool().check(key, value)


class Str(Rule):
    def __init__(self, nullable: bool = False, nonempty: bool = True) -> None:
        self.nullable, self.nonempty = nullable, nonempty

    def describe(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        if not isinstance(value, str) or (self.nonempty and not value.strip()) or value == "???":
            return False, value
        return True, value


class Choice(Rule):
    def __init__(self, *options: str, nullable: bool = False) -> None:
        self.options, self.nullable = options, nullable

    def describe(self) -> str:
        return f"one of {', '.join(self.options)}"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        return (isinstance(value, str) and value in self.options), value


class ListOf(Rule):
    def __init__(self, item: Rule, nullable: bool = False) -> None:
        self.item, self.nullable = item, nullable

    def describe(self) -> str:
        return f"a list with each item {self.item.describe()}"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, got = self.item.accepts(v)
            if not ok:
                return False, value
            out.append(got)
        return True, type(value)(out)


class AnyOf(Rule):
    def __init__(self, *rules: Rule, nullable: bool = False, text: Optional[str] = None) -> None:
        self.rules, self.nullable, self.text = rules, nullable, text

    def describe(self) -> str:
        return self.text or " or ".join(r.describe() for r in self.rules)

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        for rule in self.rules:
            if value is None and rule.nullable:
                return True, None
            ok, out = rule.accepts(value)
            if ok:
                return True, out
        return False, value


class Anything(Rule):
    def __init__(self, nullable: bool = True) -> None:
        self.nullable = nullable

    def describe(self) -> str:
        return "any value"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        return value != "???", value


class Mapping_(Rule):
    def __init__(self, nullable: bool = False) -> None:
        self.nullable = nullable

    def describe(self) -> str:
        return "a mapping {key: value}"

    def accepts(self, value: Any) -> Tuple[bool, Any]:
        return isinstance(value, Mapping), value


class Node:
    """A fixed mapping: every key has a rule (or a sub-node); others are refused."""

    def __init__(
        self, fields: Dict[str, Any], check: Optional[Callable[[str, MutableMapping[str, Any]], None]] = None
    ) -> None:
        self.fields, self.extra_check = fields, check

    def check(self, key: str, value: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, MutableMapping):
            msg = f"{key} must be a mapping of {', '.join(self.fields)}, got {_show(value)}"
            raise ConfigError(msg)
        check_keys(key, value, self.fields)
        for name, rule in self.fields.items():
            if name in value:
                value[name] = rule.check(f"{key}.{name}" if key else name, value[name])
        if self.extra_check:
            self.extra_check(key, value)
        return value


def check_keys(where: str, node: Mapping[str, Any], allowed: Iterable[str], what: str = "") -> None:
    """Refuse keys of ``node`` not in ``allowed``, with the closest real key as a hint."""
    allowed = list(allowed)
    unknown = [k for k in node if k not in allowed and k not in _HYDRA_KEYS]
    if unknown:
        prefix = f"{where}." if where else ""
        hint = _hint(unknown[0], allowed, prefix)
        names = ", ".join(prefix + k for k in unknown)
        msg = f"unknown option(s) {names}{hint}{what}; accepted: {', '.join(allowed) or 'none'}"
        raise ConfigError(msg)


# ----------------------------------------------------------------- the tables


def _check_shard(key: str, node: MutableMapping[str, Any]) -> None:  # noqa: ARG001
    index, count = node.get("index"), node.get("count", 1)
    if index is not None and not index < count:
        msg = f"shard.index must be one of 0..{count - 1} for shard.count={count}, got {index}"
        raise ConfigError(msg)


def _check_task(key: str, node: MutableMapping[str, Any]) -> None:  # noqa: ARG001
    """``task.loss`` / ``target`` / ``correct_probability`` belong to ``task=custom`` only."""
    name = node.get("name", "classification")
    given = [k for k in ("loss", "target", "correct_probability") if node.get(k) is not None]
    if name != "custom" and given:
        msg = (
            f"task.{given[0]} is for task=custom; task={name} has its own loss (remove it or use task=custom)"
        )
        raise ConfigError(msg)
    loss = node.get("loss")
    if name == "custom" and (not isinstance(loss, Mapping) or loss.get("_target_") in (None, "", "???")):
        msg = (
            "task=custom needs task.loss._target_=mypkg.make_loss (a factory f(model) -> loss(params, data))"
        )
        raise ConfigError(msg)


TRAIN = Node(
    {
        "epochs": Int(1),
        "lr": Float(0.0, 100.0),
        "momentum": Float(0.0, 1.0),
        "batch_size": Int(1),
        "weight_decay": Float(0.0, 100.0),
        "num_models": Int(1),
        "save_every": Int(0),
    }
)

RUNNER = Node(
    {
        "checkpoints": Choice("final", "trajectory"),
        "weights": Choice("ones", "learning_rates"),
        "self_influence": Bool(),
    }
)


def _progress_modes() -> Tuple[str, ...]:
    from dattri_cli.progress import MODES  # noqa: PLC0415

    return tuple(MODES)


TOP = {
    "seed": Int(0),
    "device": Str(),
    "checkpoint": AnyOf(Str(), ListOf(Str()), nullable=True, text="a file path or a list of file paths"),
    "out": Str(nullable=True),
    "overwrite": Bool(),
    "progress": Choice(*_progress_modes()),
    "cache_dir": Str(),
    "feature_cache": Bool(),
    "memory_guard": Bool(),
    "shard": Node({"index": Int(0, nullable=True), "count": Int(1)}, _check_shard),
    "output": Node(
        {
            "rows_per_file": AnyOf(
                Choice("auto"), Int(1), text="auto or a positive number of training rows per score file"
            )
        }
    ),
    "loader": Node({"train_batch_size": Int(1), "test_batch_size": Int(1)}),
    "checkpoint_prefix": Str(nullable=True, nonempty=False),
    "task": Node(
        {
            "name": Choice("classification", "regression", "causal_lm", "model_loss", "custom"),
            "weight_decay": Float(0.0, 100.0, nullable=True),
            "vmap_masks": Bool(nullable=True),
            "ignore_index": Int(),
            "loss": Mapping_(nullable=True),
            "target": Mapping_(nullable=True),
            "correct_probability": Mapping_(nullable=True),
        },
        _check_task,
    ),
}
GROUPS = ("dataset", "model", "train", "attributor")
#: config groups a run config may lack (a mapping built without it runs as task=classification)
OPTIONAL_GROUPS = ("task",)
TOP_KEYS = tuple(GROUPS) + tuple(TOP)

# ranges for constructor arguments known by name (any target that takes them)
DATASET_RULES: Dict[str, Rule] = {
    "n_train": Int(1, nullable=True),
    "n_test": Int(1, nullable=True),
    "split_seed": Int(0),
    "seed": Int(0),
    "n_samples": Int(1),
    "n_features": Int(1),
    "n_classes": Int(2),
    "class_sep": Float(0.0, MAX_ABS),
    "path": Str(),
    "test_path": Str(nullable=True),
    "label_column": Str(nullable=True),
    "image_size": AnyOf(Int(1), ListOf(Int(1)), nullable=True, text="a positive integer or [height, width]"),
    "max_length": Int(1),
    # a dotted path to f(list of samples) -> batch, for a _target_ returning a torch Dataset
    "collate_fn": Str(nullable=True),
    # read by the pipeline for every dataset, never passed to the builder
    "label_noise": Float(0.0, 1.0, open_high=True),
    "label_noise_seed": Int(0),
}
PIPELINE_DATASET_KEYS = ("label_noise", "label_noise_seed")
#: keys the pipeline applies itself when a dataset _target_ returns a plain torch Dataset
DATASET_SPLIT_KEYS = ("collate_fn", "n_train", "n_test", "split_seed")
MODEL_RULES: Dict[str, Rule] = {
    "in_features": Int(1, nullable=True),
    "num_classes": Int(1, nullable=True),  # 1: one regression output
    "hidden": ListOf(Int(1)),
    "channels": Int(1),
    "image_size": AnyOf(Int(1), ListOf(Int(1)), nullable=True, text="a positive integer or [height, width]"),
    "in_channels": Int(1),
    "head": Choice("sequence_classification", "causal_lm", "image_classification"),
}
_LAYERS = AnyOf(Str(), ListOf(Str()), nullable=True, text="a layer name or a list of layer names")
ATTRIBUTOR_RULES: Dict[str, Rule] = {
    "max_iter": Int(1),
    "tol": Float(0.0, MAX_ABS),
    "regularization": Float(0.0, MAX_ABS),
    "damping": Float(0.0, MAX_ABS, nullable=True),
    "damping_ratio": Float(0.0, MAX_ABS),
    "scaling": Float(0.0, MAX_ABS, open_low=True),
    "batch_size": Int(1),
    "num_repeat": Int(1),
    "recursion_depth": Int(1),
    "proj_dim": Int(1),
    "precompute_data_ratio": Float(0.0, 1.0, open_low=True),
    "fim_estimate_data_ratio": Float(0.0, 1.0, open_low=True),
    "norm_constant": Float(0.0, MAX_ABS, open_low=True),
    "seed": Int(0),
    "l2_strength": Float(0.0, MAX_ABS),
    "epoch": Int(1),
    "mode": Choice("rev-rev", "rev-fwd"),
    "fisher": Choice("gauss_newton", "empirical"),
    "normalized_grad": Bool(),
    "normalize_preactivate": Bool(),
    "layer_name": _LAYERS,
    "module_name": _LAYERS,
    "projector_kwargs": Mapping_(nullable=True),
    "grad_backend": Choice("auto", "func", "layers"),
    "dtype": Choice("float32", "bfloat16", "float16"),
    "feature_cache_max_gb": Float(0.0, MAX_ABS),
}
GROUP_RULES = {"dataset": DATASET_RULES, "model": MODEL_RULES, "attributor": ATTRIBUTOR_RULES}


# ------------------------------------------------------- rules from annotations


def _rule_from_annotation(annotation: Any) -> Optional[Rule]:
    """A rule for an annotated type, or None when the type says nothing checkable."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        rules = [_rule_from_annotation(a) for a in inner]
        if any(r is None for r in rules):
            return None
        return (
            AnyOf(*rules, nullable=len(inner) < len(args))
            if len(rules) > 1
            else _nullable(rules[0], len(inner) < len(args))
        )
    if origin in (list, tuple, Sequence, typing.Sequence, List, Tuple) or annotation in (list, tuple):
        item = _rule_from_annotation(args[0]) if args and args[0] is not Ellipsis else None
        return ListOf(item or Anything(nullable=True))
    if origin in (dict, Mapping, typing.Mapping, Dict) or annotation is dict:
        return Mapping_()
    simple = {bool: Bool, int: Int, float: Float, str: Str}
    if annotation in simple:
        return simple[annotation]()
    if annotation is Path:
        return Str()
    return None


def _nullable(rule: Rule, nullable: bool) -> Rule:
    if nullable and not rule.nullable:
        rule = copy.copy(rule)  # the tables' rules are shared
        rule.nullable = True
    return rule


def _hints(func: Callable) -> Dict[str, Any]:
    target = func.__init__ if inspect.isclass(func) else func  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: check names only
        return {}


def target_parameters(target: Callable) -> Tuple[Dict[str, inspect.Parameter], bool, Dict[str, Any]]:
    """The constructor parameters of ``target`` (less ``self``/``**kwargs``).

    Also whether it takes ``**kwargs``, and its type hints.
    """
    params = dict(inspect.signature(target).parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    return params, takes_any, _hints(target)


def _check_target_node(group: str, node: MutableMapping[str, Any]) -> None:
    """Keys and values of a ``dataset``/``model``/``attributor`` node against its ``_target_``."""
    from dattri_cli.builders import RUNNER_KEY, RUNTIME_FILLED, resolve_target  # noqa: PLC0415

    target_name = node.get("_target_")
    if target_name in (None, "", "???"):
        msg = f"{group}._target_ must name the class or function to build (a dotted path), got {_show(target_name)}"
        raise ConfigError(msg)
    if group == "attributor" and RUNNER_KEY in node:
        node[RUNNER_KEY] = RUNNER.check(f"{group}.{RUNNER_KEY}", node[RUNNER_KEY])
    target = resolve_target(node, group)
    params, takes_any, hints = target_parameters(target)
    extra = PIPELINE_DATASET_KEYS + DATASET_SPLIT_KEYS if group == "dataset" else ()
    given = [k for k in node if k not in _HYDRA_KEYS and not (group == "attributor" and k == RUNNER_KEY)]
    if not takes_any:
        accepted = list(params) + list(extra)
        check_keys(group, {k: None for k in given}, accepted, f" for {target_name}")
    rules = GROUP_RULES.get(group, {})
    for name in given:
        value = node[name]
        key = f"{group}.{name}"
        if value == "???":
            msg = f"{key} needs a value ({key}=...)"
            raise ConfigError(msg)
        rule = rules.get(name) or _rule_from_annotation(hints.get(name, inspect.Parameter.empty))
        if rule is None:
            continue
        if name in RUNTIME_FILLED:
            rule = _nullable(rule, True)
        node[name] = rule.check(key, value)
    if group == "attributor" and node.get("projector_kwargs") is not None:
        from dattri_cli.func.projection import resolve_projector_kwargs  # noqa: PLC0415

        try:
            resolve_projector_kwargs(node["projector_kwargs"])
        except ConfigError as exc:
            raise ConfigError(
                f"attributor.{exc}"
                if str(exc).startswith("projector_kwargs")
                else f"attributor.projector_kwargs: {exc}"
            ) from exc


# -------------------------------------------------------------- entry points


def check_cache_dir(path_text: str) -> None:
    """Refuse a ``cache_dir`` that cannot be created or written, before anything is trained."""
    path = Path(os.path.expanduser(str(path_text)))
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        msg = (
            f"cache_dir={path_text} cannot be used: {probe} is a file, not a directory; set cache_dir "
            "to a writable directory"
        )
        raise ConfigError(msg)
    if not _can_write_in(probe):
        msg = (
            f"cache_dir={path_text} is not writable ({probe} denies writing); set cache_dir (or "
            "DATTRI_CACHE_DIR) to a writable directory"
        )
        raise ConfigError(msg)


def _can_write_in(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried: permission bits lie to root and on read-only mounts)."""
    import tempfile  # noqa: PLC0415

    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def validate_run(cfg: MutableMapping[str, Any], check_paths: bool = True) -> MutableMapping[str, Any]:
    """Check a resolved ``dattri run`` config (a plain dict) against the schema; return it.

    Booleans given as words become bools in place; every other value is left as given
    (so valid configs hash as before). The first problem raises :class:`ConfigError`.
    """
    check_keys("", cfg, TOP_KEYS)
    for group in GROUPS:
        if group not in cfg or not isinstance(cfg[group], MutableMapping):
            msg = f"{group} must be a config group (pick one with {group}=NAME; see `dattri list`)"
            raise ConfigError(msg)
    for name, rule in TOP.items():
        if name in cfg:
            cfg[name] = rule.check(name, cfg[name])
    cfg["train"] = TRAIN.check("train", cfg["train"])
    for group in ("dataset", "model", "attributor"):
        _check_target_node(group, cfg[group])
    if check_paths and cfg.get("cache_dir") and (not cfg.get("checkpoint") or cfg.get("feature_cache")):
        check_cache_dir(cfg["cache_dir"])
    return cfg


def validate_settings(
    where: str, values: MutableMapping[str, Any], rules: Mapping[str, Rule]
) -> MutableMapping[str, Any]:
    """Check ``KEY=VALUE`` settings of a command (``groundtruth``, ``eval``) against ``rules``."""
    check_keys("", values, rules, f" for dattri {where}")
    for name, rule in rules.items():
        if name in values:
            values[name] = rule.check(name, values[name])
    return values


GROUNDTRUTH_SETTINGS: Dict[str, Rule] = {
    "num_subsets": Int(0),
    "alpha": Float(0.0, 1.0, open_low=True, open_high=True),
    "seeds_per_subset": Int(1),
    "seed": Int(0),
    "loo": ListOf(Int(0)),
    "workers": Int(1),
    "work_dir": Str(nullable=True),
    "out": Str(),
    "max_jobs": Int(0, nullable=True),
}
EVAL_SETTINGS: Dict[str, Rule] = {
    "scores": Str(),
    "groundtruth": Str(),
    "out": Str(nullable=True),
    "bootstrap": Int(1),
    "level": Float(0.0, 1.0, open_low=True, open_high=True),
    "seed": Int(0),
    "json": Bool(),
}


def yaml_value(text: str) -> Any:
    """A ``KEY=VALUE`` value read like Hydra reads overrides (numbers, lists, null, words)."""
    import yaml  # noqa: PLC0415 - a Hydra dependency

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def known_keys() -> Tuple[str, ...]:
    """Top-level keys of the run config (groups included)."""
    return TOP_KEYS


__all__ = [
    "Bool",
    "ConfigError",
    "EVAL_SETTINGS",
    "GROUNDTRUTH_SETTINGS",
    "TOP_KEYS",
    "check_cache_dir",
    "closest",
    "parse_bool",
    "validate_run",
    "validate_settings",
    "yaml_value",
]
