"""Config -> objects: ``build(node) = target(**node, **runtime values it leaves unset)``.

The only module that calls ``hydra.utils.instantiate``. Config nodes carry ``_target_``
plus constructor kwargs. Values only known at run time (the task, the device, TracIn
weights, TRAK's probability function, RPS's layer name, a model's input size) are
filled here by parameter name (:data:`RUNTIME_FILLED`), and only when the config
leaves them unset. The rest of the run's objects are built here too: the checked
device, the split (with label noise), the model factory, the checkpoints (yours, or
trained and cached), the task, the attributor and its feature store, and the
``config_hash`` that identifies results that belong together.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor
from dattri_cli.data import Split
from dattri_cli.data.noise import NOISE_KEYS, flip_labels
from dattri_cli.errors import ConfigError, DataError, DattriError
from dattri_cli.feature_cache import BlockStore, train_fingerprint
from dattri_cli.hashing import file_sha256, json_sha256
from dattri_cli.models.train import (
    Checkpoint,
    TrainSettings,
    correct_probability,
    make_loss_funcs,
    trained_checkpoints,
)
from dattri_cli.task import AttributionTask, load_state_dict_file

RUNNER_KEY = "runner"
#: attributor parameters the runner fills (when the config leaves them unset): never in a YAML config
RUNTIME_ATTRIBUTOR_PARAMS = (
    "task",
    "device",
    "weight_list",
    "correct_probability_func",
    "final_linear_layer_name",
)
#: model parameters filled from the data
RUNTIME_MODEL_PARAMS = ("in_features", "num_classes")
#: every parameter name filled at run time
RUNTIME_FILLED = RUNTIME_ATTRIBUTOR_PARAMS + RUNTIME_MODEL_PARAMS
# keys of the run config that change how a run looks, never what it computes
# (shard.*: which rows a process scores; output.*: how the rows are laid out in files;
# feature_cache: whether train-side blocks are kept on disk)
NON_RESULT_KEYS = (
    "out",
    "progress",
    "overwrite",
    "cache_dir",
    "shard",
    "output",
    "feature_cache",
    "memory_guard",  # the batch sizes it chooses are recorded under loader.*
)
CHECKPOINT_CHOICES = ("final", "trajectory")
WEIGHT_CHOICES = ("ones", "learning_rates")
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


# -- the run's objects, in the order a run builds them ------------------------------------------------


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the result-determining part of the resolved config (all but :data:`NON_RESULT_KEYS`)."""
    return json_sha256({k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS})


def result_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of the resolved config that determines the scores (what :func:`config_hash` hashes)."""
    return {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}


def check_device(device: str) -> str:
    """Refuse a device this machine does not have, before any work."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        msg = f"device={device!r} is not a device name; use cpu, cuda, cuda:1 or mps"
        raise ConfigError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = (
            f"device={device} but this torch build sees no CUDA GPU; "
            "use device=cpu or install a CUDA build of torch"
        )
        raise ConfigError(msg)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        msg = f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        raise ConfigError(msg)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        msg = "device=mps but MPS is not available here; use device=cpu"
        raise ConfigError(msg)
    return device


def build_split(cfg: Mapping[str, Any]) -> Split:
    """The dataset split the config names (with ``dataset.label_noise`` applied)."""
    return build_split_and_flips(cfg)[0]


def build_split_and_flips(cfg: Mapping[str, Any]) -> Tuple[Split, torch.Tensor]:
    """The split and the int64 mask of train labels flipped by ``dataset.label_noise``.

    The noise keys are read here, not passed to the dataset builder, so every
    dataset (your own included) supports them.
    """
    node = dict(cfg["dataset"])
    fraction = float(node.pop(NOISE_KEYS[0], 0.0) or 0.0)
    noise_seed = int(node.pop(NOISE_KEYS[1], 0) or 0)
    split = build(node, "dataset")
    if not isinstance(split, Split):
        msg = f"dataset._target_ must return a dattri_cli.data.Split, got {type(split).__name__}"
        raise ConfigError(msg)
    return flip_labels(split, fraction, noise_seed)


def model_factory(cfg: Mapping[str, Any], split: Split, device: str) -> Callable[[], torch.nn.Module]:
    """A zero-argument function building the configured model on ``device``."""
    runtime = dict(zip(RUNTIME_MODEL_PARAMS, (split.num_features, split.num_classes)))
    fixed = cfg["model"].get("num_classes")
    if isinstance(fixed, int) and not isinstance(fixed, bool) and split.num_classes > fixed:
        msg = (
            f"the labels go up to {split.num_classes - 1} but model.num_classes={fixed}; "
            "raise model.num_classes or leave it unset to use the data's"
        )
        raise DataError(msg)

    def build_model() -> torch.nn.Module:
        model = build(cfg["model"], "model", runtime)
        if not isinstance(model, torch.nn.Module):
            msg = f"model._target_ must build a torch.nn.Module, got {type(model).__name__}"
            raise ConfigError(msg)
        return model.to(device)

    return build_model


def user_checkpoints(spec: Any, lr: float) -> List[Checkpoint]:
    """The checkpoint file(s) named by ``checkpoint=``, each read once now so a bad one fails early."""
    paths = spec if isinstance(spec, list) else [spec]
    out = []
    for i, p in enumerate(paths):
        path = Path(str(p)).expanduser()
        load_state_dict_file(path)  # fail now, with a clear message, if unreadable
        out.append(Checkpoint(path, i, 0, lr))
    return out


def acquire_checkpoints(
    resolved: Mapping[str, Any],
    build_model: Any,
    split: Split,
    settings: TrainSettings,
    seed: int,
    rank: int = 0,
) -> List[Checkpoint]:
    """The user's checkpoint files, or checkpoints trained (or found in the cache) from ``seed``."""
    if resolved.get("checkpoint"):
        return user_checkpoints(resolved["checkpoint"], settings.lr)
    key_parts = {"dataset": resolved["dataset"], "model": resolved["model"]}
    if rank != 0:  # rank 0 trains (or finds) the checkpoints; the others then find them cached
        distributed.barrier()
    cache_dir = Path(resolved["cache_dir"])
    checkpoints = trained_checkpoints(build_model, split, settings, seed, cache_dir, key_parts)
    if rank == 0:
        distributed.barrier()
    return checkpoints


def select_checkpoints(checkpoints: List[Checkpoint], mode: str) -> List[Checkpoint]:
    """``final``: the last checkpoint of every model; ``trajectory``: all of them."""
    if mode not in CHECKPOINT_CHOICES:
        msg = f"attributor.runner.checkpoints must be one of {CHECKPOINT_CHOICES}, got {mode!r}"
        raise ConfigError(msg)
    if mode == "trajectory":
        return checkpoints
    last: Dict[int, Checkpoint] = {}
    for c in checkpoints:
        if c.model_index not in last or c.epoch > last[c.model_index].epoch:
            last[c.model_index] = c
    return [last[i] for i in sorted(last)]


def checkpoint_weights(checkpoints: List[Checkpoint], mode: str) -> torch.Tensor:
    """TracIn weights: learning rates along the run, or ones (Grad-Dot / Grad-Cos)."""
    if mode not in WEIGHT_CHOICES:
        msg = f"attributor.runner.weights must be one of {WEIGHT_CHOICES}, got {mode!r}"
        raise ConfigError(msg)
    if mode == "ones":
        return torch.ones(len(checkpoints))
    return torch.tensor([c.lr for c in checkpoints])


def build_task(
    model: torch.nn.Module, checkpoints: List[Checkpoint], settings: TrainSettings, split: Split
) -> AttributionTask:
    """The task over the checkpoints: training loss (with weight decay) and test cross-entropy."""
    sample_ndim = split.x_train.dim() - 1  # one sample's input dimensions (dattri's per-sample calls)
    loss_func, target_func = make_loss_funcs(model, settings.weight_decay, sample_ndim)
    task = AttributionTask(loss_func, model, [str(c.path) for c in checkpoints], target_func=target_func)
    task.get_param(0)  # load the first checkpoint now: a mismatch fails before any heavy work
    return task


def build_attributor(
    attributor_cfg: Mapping[str, Any],
    runner: Mapping[str, Any],
    task: AttributionTask,
    checkpoints: List[Checkpoint],
    split: Split,
    device: str,
) -> Attributor:
    """The configured attributor, its runtime parameters (:data:`RUNTIME_ATTRIBUTOR_PARAMS`) filled."""
    model = task.get_model()
    sample_ndim = split.x_train.dim() - 1
    runtime = {
        "task": task,
        "device": device,
        "weight_list": checkpoint_weights(checkpoints, runner.get("weights", "ones")),
        "correct_probability_func": correct_probability(model, sample_ndim),
        "final_linear_layer_name": getattr(model, "final_layer", None),
    }
    attributor = build(attributor_cfg, "attributor", runtime)
    if not isinstance(attributor, Attributor):
        msg = (
            "attributor._target_ must build a dattri_cli.algorithm.base.Attributor, "
            f"got {type(attributor).__name__}; subclass it (docs/architecture.md)"
        )
        raise ConfigError(msg)
    return attributor


def feature_store_factory(
    root: Path,
    checkpoint_hashes: List[str],
    split: Split,
    attributor: Attributor,
    dtype: torch.dtype,
    device: str,
    stats: Dict[str, List[BlockStore]],
) -> Callable[..., BlockStore]:
    """``f(kind, ckpt_idx, extra) -> BlockStore`` keyed by what determines the blocks (opened: ``stats``)."""
    fingerprint = train_fingerprint(split.x_train, split.y_train, split.train_indices)

    def make(kind: str, ckpt_idx: int, extra: Mapping[str, Any]) -> BlockStore:
        parts = {
            "checkpoint_sha256": checkpoint_hashes[ckpt_idx],
            "train_data": fingerprint,
            "layer_name": attributor.layer_name,
            "dtype": str(dtype),
            "device_type": torch.device(device).type,
            **extra,
        }
        store = BlockStore.keyed(root, kind, parts)
        stats.setdefault(kind, []).append(store)
        return store

    return make


def checkpoint_hashes(checkpoints: List[Checkpoint]) -> List[str]:
    """SHA-256 of each checkpoint file (recorded in the score file, keying the feature cache)."""
    return [file_sha256(c.path) for c in checkpoints]


__all__ = [
    "CHECKPOINT_CHOICES",
    "NON_RESULT_KEYS",
    "RUNNER_KEY",
    "RUNTIME_ATTRIBUTOR_PARAMS",
    "RUNTIME_FILLED",
    "RUNTIME_MODEL_PARAMS",
    "WEIGHT_CHOICES",
    "acquire_checkpoints",
    "build",
    "build_attributor",
    "build_split",
    "build_split_and_flips",
    "build_task",
    "check_device",
    "check_kwargs",
    "checkpoint_hashes",
    "checkpoint_weights",
    "config_hash",
    "feature_store_factory",
    "model_factory",
    "resolve_target",
    "result_config",
    "select_checkpoints",
    "split_runner",
    "to_dict",
    "user_checkpoints",
]
