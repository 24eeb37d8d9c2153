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

import functools
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor
from dattri_cli.data import Split, protocol
from dattri_cli.data.noise import NOISE_KEYS, flip_labels
from dattri_cli.errors import ConfigError, DataError, DattriError
from dattri_cli.feature_cache import BlockStore
from dattri_cli.func.representer import TASK_LOSSES
from dattri_cli.hashing import json_sha256, tree_sha256
from dattri_cli.models.train import Checkpoint, TrainSettings, trained_checkpoints
from dattri_cli.task import AttributionTask, default_checkpoint_load_func, load_state_dict_file
from dattri_cli.tasks import TaskFunctions

log = logging.getLogger("dattri_cli")

RUNNER_KEY = "runner"
#: attributor parameters the runner fills (when the config leaves them unset): never in a YAML config
RUNTIME_ATTRIBUTOR_PARAMS = (
    "task",
    "device",
    "weight_list",
    "correct_probability_func",
    "final_linear_layer_name",
    "final_layer_loss",
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


def build(
    node: Mapping[str, Any],
    where: str,
    runtime: Mapping[str, Any] | None = None,
    fill_var_kwargs: bool = False,
) -> Any:
    """Instantiate ``node``, filling parameters it leaves unset (or null) from ``runtime``.

    ``fill_var_kwargs``: a target taking ``**kwargs`` also gets the runtime values
    (not None) it does not name (a model factory ``f(**kwargs)`` gets ``num_classes``).
    """
    from hydra.utils import instantiate  # noqa: PLC0415

    node = dict(node)
    params = check_kwargs(node, where)
    takes_any = fill_var_kwargs and _accepted(resolve_target(node, where))[1]
    extra = {}
    for name, value in (runtime or {}).items():
        named = name in params or (takes_any and value is not None)
        if named and node.get(name) is None:
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


#: the task the run config names when it has no ``task`` node
DEFAULT_TASK = "classification"
#: split keys the pipeline applies itself to a plain ``torch.utils.data.Dataset`` (never passed to it)
DATASET_SPLIT_KEYS = ("n_train", "n_test", "split_seed")
#: the model builder of ``model=hf`` (its ``path`` is the default checkpoint)
HF_MODEL_TARGET = "dattri_cli.models.hf.hf_model"


def task_name(cfg: Mapping[str, Any]) -> str:
    """The ``task.name`` of the run config (``classification`` when absent)."""
    return str((cfg.get("task") or {}).get("name") or DEFAULT_TASK)


def build_split(cfg: Mapping[str, Any]) -> Any:
    """The dataset split the config names (with ``dataset.label_noise`` applied)."""
    return build_split_and_flips(cfg)[0]


def _collate(spec: Any) -> Optional[Callable]:
    """``dataset.collate_fn``: a dotted path to a function (None: PyTorch's default)."""
    if spec in (None, ""):
        return None
    func = resolve_target({"_target_": spec}, "dataset.collate_fn")
    if not callable(func):
        msg = f"dataset.collate_fn={spec} is not callable; name a function f(list_of_samples) -> batch"
        raise ConfigError(msg)
    return func


def build_split_and_flips(cfg: Mapping[str, Any]) -> Tuple[Any, torch.Tensor]:
    """The split and the int64 mask of train labels flipped by ``dataset.label_noise``.

    The noise keys are read here, not passed to the dataset builder, so every
    dataset (your own included) supports them. A ``_target_`` returning a plain
    ``torch.utils.data.Dataset`` is split here (``n_train`` / ``n_test`` /
    ``split_seed``, batched with ``dataset.collate_fn``).
    """
    node = dict(cfg["dataset"])
    fraction = float(node.pop(NOISE_KEYS[0], 0.0) or 0.0)
    noise_seed = int(node.pop(NOISE_KEYS[1], 0) or 0)
    collate = _collate(node.pop("collate_fn", None))
    params, takes_any = _accepted(resolve_target(node, "dataset"))
    own = {k: node.pop(k) for k in DATASET_SPLIT_KEYS if k in node and k not in params and not takes_any}
    built = build(node, "dataset", {"task": task_name(cfg)})
    if isinstance(built, Split) or protocol.is_split(built):
        split = built
    elif isinstance(built, torch.utils.data.Dataset):
        split = protocol.dataset_split(
            str(node["_target_"]),
            built,
            own.get("n_train"),
            own.get("n_test"),
            int(own.get("split_seed") or 0),
            collate,
        )
    else:
        msg = (
            "dataset._target_ must return a dattri_cli.data.Split (or an image/text split) or a "
            f"torch.utils.data.Dataset, got {type(built).__name__}"
        )
        raise ConfigError(msg)
    if collate is not None and not isinstance(split, protocol.DatasetSplit):
        msg = (
            "dataset.collate_fn applies to a _target_ returning a torch Dataset; this dataset batches itself"
        )
        raise ConfigError(msg)
    if isinstance(split, Split):
        return flip_labels(split, fraction, noise_seed)
    if fraction > 0:
        msg = (
            f"dataset.label_noise works on in-memory (x, y) datasets, not on {type(split).__name__}; "
            "set dataset.label_noise=0"
        )
        raise ConfigError(msg)
    return split, torch.zeros(protocol.n_train(split), dtype=torch.int64)


def output_size(cfg: Mapping[str, Any], split: Any) -> Optional[int]:
    """The model's output width the data asks for: classes, or the regression target's width."""
    if task_name(cfg) == "regression":
        shape = protocol.targets_shape(split)
        if shape is None:
            return None
        width = 1
        for d in shape:
            width *= int(d)
        return width
    return getattr(split, "num_classes", None)


def model_factory(cfg: Mapping[str, Any], split: Any, device: str) -> Callable[[], torch.nn.Module]:
    """A zero-argument function building the configured model on ``device``."""
    outputs = output_size(cfg, split)
    runtime = dict(zip(RUNTIME_MODEL_PARAMS, (protocol.num_features(split), outputs)))
    fixed = cfg["model"].get("num_classes")
    if (
        task_name(cfg) == "classification"
        and isinstance(fixed, int)
        and not isinstance(fixed, bool)
        and outputs is not None
        and outputs > fixed
    ):
        msg = (
            f"the labels go up to {outputs - 1} but model.num_classes={fixed}; "
            "raise model.num_classes or leave it unset to use the data's"
        )
        raise DataError(msg)

    def build_model() -> torch.nn.Module:
        model = build(cfg["model"], "model", runtime, fill_var_kwargs=True)
        if not isinstance(model, torch.nn.Module):
            msg = f"model._target_ must build a torch.nn.Module, got {type(model).__name__}"
            raise ConfigError(msg)
        return model.to(device)

    return build_model


def user_checkpoints(spec: Any, lr: float) -> List[Checkpoint]:
    """The checkpoint file(s) or Hugging Face model folder(s) named by ``checkpoint=``, each read once now."""
    paths = spec if isinstance(spec, list) else [spec]
    out = []
    for i, p in enumerate(paths):
        path = Path(str(p)).expanduser()
        load_state_dict_file(path)  # fail now, with a clear message, if unreadable
        out.append(Checkpoint(path, i, 0, lr))
    return out


def default_checkpoint(resolved: Mapping[str, Any]) -> Any:
    """``checkpoint``, or the folder of ``model=hf model.path=DIR`` (its weights) when ``checkpoint`` is unset."""
    if resolved.get("checkpoint"):
        return resolved["checkpoint"]
    model = resolved.get("model") or {}
    if model.get("_target_") == HF_MODEL_TARGET and model.get("path"):
        log.info("checkpoint: the weights of model.path=%s", model["path"])
        return model["path"]
    return None


def _is_builtin_model(resolved: Mapping[str, Any]) -> bool:
    target = str((resolved.get("model") or {}).get("_target_") or "")
    return target.startswith("dattri_cli.models.") and target != HF_MODEL_TARGET


def acquire_checkpoints(
    resolved: Mapping[str, Any],
    build_model: Any,
    split: Any,
    settings: TrainSettings,
    seed: int,
    rank: int = 0,
    make_objective: Optional[Callable] = None,
) -> List[Checkpoint]:
    """The user's checkpoint files, or checkpoints trained (or found in the cache) from ``seed``.

    ``make_objective(model) -> f(batch) -> loss`` is the training loss of a task other
    than cross-entropy on ``(x, y)`` tensors (see :func:`training_objective`).
    """
    given = default_checkpoint(resolved)
    if given:
        return user_checkpoints(given, settings.lr)
    if not _is_builtin_model(resolved) and rank == 0:
        log.warning(
            "no checkpoint given: training model._target_=%s from scratch with train.* "
            "(%d epoch(s), lr %g); pass checkpoint=PATH to attribute your trained weights",
            (resolved.get("model") or {}).get("_target_"),
            settings.epochs,
            settings.lr,
        )
    key_parts = {"dataset": resolved["dataset"], "model": resolved["model"]}
    if task_name(resolved) != DEFAULT_TASK:  # another training loss: other checkpoints
        key_parts["task"] = resolved.get("task")
    if rank != 0:  # rank 0 trains (or finds) the checkpoints; the others then find them cached
        distributed.barrier()
    cache_dir = Path(resolved["cache_dir"])
    checkpoints = trained_checkpoints(
        build_model, split, settings, seed, cache_dir, key_parts, make_objective
    )
    if rank == 0:
        distributed.barrier()
    return checkpoints


def trained_here(resolved: Mapping[str, Any]) -> bool:
    """Whether the run trains (or reuses its own cached) checkpoints rather than attributing given weights."""
    return not default_checkpoint(resolved)


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


def task_functions(
    resolved: Mapping[str, Any],
    model: torch.nn.Module,
    split: Any,
    settings: TrainSettings,
) -> Tuple[TaskFunctions, Dict[str, Any]]:
    """The task's loss / target / correct-probability functions and a record of the L2 term used.

    The L2 term ``weight_decay / 2 * ||params||^2`` joins the training loss when
    ``task.weight_decay`` is set, or, when it is null, when the tool trained the
    checkpoints itself (``train.weight_decay``, what its optimiser minimised). Your own
    checkpoints get the plain loss: the tool does not know how they were trained.
    """
    node = dict(resolved.get("task") or {})
    explicit = node.get("weight_decay")
    if explicit is not None:
        wd, source = float(explicit), "task.weight_decay"
    elif trained_here(resolved):
        wd, source = float(settings.weight_decay), "train.weight_decay (checkpoints trained by dattri)"
    else:
        wd, source = 0.0, "none: your own checkpoint (set task.weight_decay to add an L2 term)"
    functions = make_task_functions(node, model, protocol.sample_ndim(split), wd)
    record = {"task": functions.name, "weight_decay": functions.weight_decay, "weight_decay_source": source}
    return functions, record


def make_task_functions(
    node: Mapping[str, Any], model: torch.nn.Module, sample_ndim: int, weight_decay: float
) -> TaskFunctions:
    """:func:`dattri_cli.tasks.build_task` for a ``task`` config node (``custom``: your factories)."""
    from dattri_cli import tasks  # noqa: PLC0415

    name = str(node.get("name") or DEFAULT_TASK)
    options = {k: node[k] for k in ("vmap_masks", "ignore_index") if node.get(k) is not None}
    if name != "custom":
        if name != "causal_lm":
            options.pop("ignore_index", None)
        return tasks.build_task(name, model, sample_ndim, weight_decay, **options)
    runtime = {"model": model, "sample_ndim": sample_ndim}
    made = {}
    for key in ("loss", "target", "correct_probability"):
        spec = node.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping) or not spec.get("_target_"):
            msg = f"task.{key} must be a mapping with _target_ (a factory f(model) -> f(params, data))"
            raise ConfigError(msg)
        func = build(spec, f"task.{key}", runtime)
        if not callable(func):
            msg = f"task.{key}._target_ must return a function f(params, data) -> scalar, got {type(func).__name__}"
            raise ConfigError(msg)
        made[key] = func
    if "loss" not in made:
        msg = (
            "task=custom needs task.loss._target_: a factory f(model) returning loss(params, data) -> scalar"
        )
        raise ConfigError(msg)
    plain = made["loss"]
    loss = plain
    if weight_decay > 0:
        from dattri_cli.models.train import l2_penalty  # noqa: PLC0415

        def loss(params: Dict[str, torch.Tensor], data: Any) -> torch.Tensor:
            return plain(params, data) + l2_penalty(params, weight_decay)

    return TaskFunctions(
        "custom", loss, made.get("target", plain), made.get("correct_probability"), weight_decay
    )


def training_objective(resolved: Mapping[str, Any], split: Any) -> Optional[Callable]:
    """``make(model) -> f(batch) -> loss`` training the task's plain loss; None for cross-entropy on tensors.

    None keeps :func:`dattri_cli.models.train.train_one`'s own cross-entropy path (the
    digits, synthetic and file datasets with ``task=classification``), so those
    checkpoints are the ones trained before tasks existed.
    """
    if task_name(resolved) == DEFAULT_TASK and isinstance(split, Split):
        return None
    node = dict(resolved.get("task") or {})
    ndim = protocol.sample_ndim(split)

    def make(model: torch.nn.Module) -> Callable:
        loss = make_task_functions(node, model, ndim, 0.0).loss_func

        def objective(batch: Any) -> torch.Tensor:
            return loss(dict(model.named_parameters()), batch)

        return objective

    return make


def build_task(
    model: torch.nn.Module,
    checkpoints: List[Checkpoint],
    settings: TrainSettings,
    split: Any,
    functions: Optional[TaskFunctions] = None,
    checkpoint_prefix: Optional[str] = None,
) -> AttributionTask:
    """The task over the checkpoints: the training loss and the test target of ``functions``.

    ``functions`` None: classification with ``train.weight_decay`` (checkpoints the tool trained).
    """
    if functions is None:
        from dattri_cli import tasks  # noqa: PLC0415

        functions = tasks.classification(model, protocol.sample_ndim(split), settings.weight_decay)
    load = (
        functools.partial(default_checkpoint_load_func, prefix=checkpoint_prefix)
        if checkpoint_prefix is not None
        else None
    )
    task = AttributionTask(
        functions.loss_func,
        model,
        [str(c.path) for c in checkpoints],
        target_func=functions.target_func,
        checkpoints_load_func=load,
    )
    task.get_param(0)  # load the first checkpoint now: a mismatch fails before any heavy work
    return task


def build_attributor(
    attributor_cfg: Mapping[str, Any],
    runner: Mapping[str, Any],
    task: AttributionTask,
    checkpoints: List[Checkpoint],
    split: Any,
    device: str,
    functions: Optional[TaskFunctions] = None,
) -> Attributor:
    """The configured attributor, its runtime parameters (:data:`RUNTIME_ATTRIBUTOR_PARAMS`) filled.

    ``correct_probability_func`` comes from the task (None for tasks without one: TRAK then weights every sample 1).
    """
    model = task.get_model()
    if functions is None:
        from dattri_cli import tasks  # noqa: PLC0415

        functions = tasks.classification(model, protocol.sample_ndim(split))
    runtime = {
        "task": task,
        "device": device,
        "weight_list": checkpoint_weights(checkpoints, runner.get("weights", "ones")),
        "correct_probability_func": functions.correct_probability_func,
        "final_linear_layer_name": getattr(model, "final_layer", None),
        # RPS's fit needs the task's loss in closed form; other tasks reach it by name and are refused
        "final_layer_loss": TASK_LOSSES.get(functions.name, f"task={functions.name}"),
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
    split: Any,
    attributor: Attributor,
    dtype: torch.dtype,
    device: str,
    stats: Dict[str, List[BlockStore]],
    loss_key: Optional[Mapping[str, Any]] = None,
) -> Callable[..., BlockStore]:
    """``f(kind, ckpt_idx, extra) -> BlockStore`` keyed by what determines the blocks (opened: ``stats``).

    ``loss_key`` (the task and its L2 term) joins the key: the same checkpoint and data
    under another loss (your checkpoint without the L2 term) give other Hessians.
    """
    fingerprint = protocol.train_fingerprint(split)

    def make(kind: str, ckpt_idx: int, extra: Mapping[str, Any]) -> BlockStore:
        parts = {
            "checkpoint_sha256": checkpoint_hashes[ckpt_idx],
            "train_data": fingerprint,
            "layer_name": attributor.layer_name,
            "dtype": str(dtype),
            "device_type": torch.device(device).type,
            **({"loss": dict(loss_key)} if loss_key else {}),
            **extra,
        }
        store = BlockStore.keyed(root, kind, parts)
        stats.setdefault(kind, []).append(store)
        return store

    return make


def checkpoint_hashes(checkpoints: List[Checkpoint]) -> List[str]:
    """SHA-256 of each checkpoint file or model folder (recorded in the score file, keying the feature cache)."""
    return [tree_sha256(c.path) for c in checkpoints]


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
