"""Deterministic training of checkpoints, cached on disk by what determines them.

A checkpoint depends only on the data split, the model config, the training
settings and the seed; those are hashed into a cache key so a second run with the
same inputs reuses the files, and any change trains afresh. ``manifest.json``
records each file's SHA-256 and tensor shapes; a cached set whose manifest or files
do not check out (unreadable, truncated, replaced) is trained afresh and replaced
atomically, with one log line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from dattri_cli.data import Split
from dattri_cli.errors import ConfigError
from dattri_cli.hashing import file_sha256, json_sha256
from dattri_cli.io import atomic_write
from dattri_cli.progress import track

log = logging.getLogger("dattri_cli")


@dataclass
class TrainSettings:
    """How checkpoints are produced (mirrors ``configs/train/*.yaml``)."""

    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64
    weight_decay: float = 1e-3
    num_models: int = 1
    save_every: int = 0  # epochs between kept intermediate checkpoints; 0 keeps only the final one

    def __post_init__(self) -> None:
        """Refuse values of the wrong type or range with the key named."""
        rules = {
            "epochs": (int, 1),
            "batch_size": (int, 1),
            "num_models": (int, 1),
            "save_every": (int, 0),
            "lr": (float, 0.0),
            "momentum": (float, 0.0),
            "weight_decay": (float, 0.0),
        }
        for name, (kind, low) in rules.items():
            value = getattr(self, name)
            ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int:
                ok_type = ok_type and float(value).is_integer()
            if not ok_type or value < low:
                need = "an integer" if kind is int else "a number"
                msg = f"train.{name} must be {need} >= {low}, got {value!r}"
                raise ConfigError(msg)
            setattr(self, name, kind(value))


@dataclass
class Checkpoint:
    """One saved checkpoint: its file, which model it belongs to, and the learning rate then."""

    path: Path
    model_index: int
    epoch: int
    lr: float


def l2_penalty(params: Dict[str, Tensor], weight_decay: float) -> Tensor:
    """``weight_decay / 2 * ||params||^2``: the regulariser the built-in models train with."""
    return 0.5 * weight_decay * sum((p * p).sum() for p in params.values())


def make_loss_funcs(model: nn.Module, weight_decay: float, sample_ndim: int) -> tuple[Callable, Callable]:
    """Training loss (cross-entropy + L2) and test target (cross-entropy), in dattri's convention.

    Both take ``(params_dict, (x, y))``. ``x`` is a batch, or one sample without a
    batch dimension (``x.dim() == sample_ndim``: how TracIn and TRAK call them), in
    which case the sample is made a batch of one; the value is the batch mean. The
    L2 term is the one the optimiser minimised, so the Hessian of the mean training
    loss is the curvature the model was actually trained on.
    """

    def logits_and_labels(params: Dict[str, Tensor], batch: tuple) -> tuple[Tensor, Tensor]:
        x, y = batch
        if x.dim() == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return torch.func.functional_call(model, params, (x,)), y

    def loss_func(params: Dict[str, Tensor], batch: tuple) -> Tensor:
        logits, y = logits_and_labels(params, batch)
        return nn.functional.cross_entropy(logits, y) + l2_penalty(params, weight_decay)

    def target_func(params: Dict[str, Tensor], batch: tuple) -> Tensor:
        logits, y = logits_and_labels(params, batch)
        return nn.functional.cross_entropy(logits, y)

    return loss_func, target_func


def correct_probability(model: nn.Module, sample_ndim: int) -> Callable:
    """``p(correct label)`` of one sample (no batch dimension, as TRAK calls it), for ``1 - p``."""
    _, target_func = make_loss_funcs(model, 0.0, sample_ndim)

    def func(params: Dict[str, Tensor], sample: tuple) -> Tensor:
        return torch.exp(-target_func(params, sample))

    return func


def cache_key(parts: Dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return json_sha256(parts)[:16]


def save_state_dict(state: Dict[str, Tensor], path: Path) -> None:
    """Write ``state`` (on the CPU) as safetensors through :func:`dattri_cli.io.atomic_write`."""
    from safetensors.torch import save_file  # noqa: PLC0415

    cpu = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp))


def train_one(
    model: nn.Module,
    split: Any,
    settings: TrainSettings,
    seed: int,
    objective: Optional[Callable[[Any], Tensor]] = None,
) -> List[tuple[int, Dict[str, Tensor]]]:
    """Minibatch SGD from ``seed``; returns ``(epoch, state_dict)`` for each kept checkpoint.

    ``objective(batch) -> loss`` (a task's plain loss on the model's live parameters)
    trains any split, its batches made by the split's ``collate_fn`` and moved to the
    model's device; without it, cross-entropy on the ``(x, y)`` tensors of a
    :class:`~dattri_cli.data.Split` (the arithmetic checkpoints have always had).
    The L2 term is the optimiser's ``weight_decay`` either way.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    if objective is None:
        if not isinstance(split, Split):
            msg = f"training on a {type(split).__name__} needs the task's objective"
            raise TypeError(msg)

        n = split.x_train.shape[0]

        def step(idx: Tensor) -> Tensor:
            return nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])

    else:
        from dattri_cli.data import protocol  # noqa: PLC0415
        from dattri_cli.func.batch import to_device  # noqa: PLC0415

        rows = protocol.train_dataset(split)
        collate = protocol.collate_fn(split) or torch.utils.data.default_collate
        n = protocol.n_train(split)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def step(idx: Tensor) -> Tensor:
            batch = collate([rows[int(i)] for i in idx])
            return objective(to_device(batch, device))

    kept = []
    model.train()
    for epoch in track(range(1, settings.epochs + 1), f"training model (seed {seed})"):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            optimizer.zero_grad()
            loss = step(idx)
            loss.backward()
            optimizer.step()
        last = epoch == settings.epochs
        if last or (settings.save_every and epoch % settings.save_every == 0):
            kept.append((epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    model.eval()
    return kept


def trained_checkpoints(
    build_model: Callable[[], nn.Module],
    split: Split,
    settings: TrainSettings,
    seed: int,
    cache_dir: Path,
    key_parts: Dict[str, Any],
    make_objective: Optional[Callable[[nn.Module], Callable[[Any], Tensor]]] = None,
) -> List[Checkpoint]:
    """Checkpoints for ``num_models`` models (seeds ``seed, seed+1, ...``), trained or reused.

    ``make_objective(model)`` gives :func:`train_one` the task's loss (None: cross-entropy).
    """
    key = cache_key({**key_parts, "data": split.fingerprint(), "train": settings.__dict__, "seed": seed})
    folder = Path(cache_dir).expanduser() / "checkpoints" / key
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() or manifest_path.is_symlink():
        checkpoints, problem = _verified_checkpoints(folder, manifest_path)
        if problem is None:
            return checkpoints
        log.warning("checkpoint cache %s: %s; training the checkpoints afresh", folder, problem)
    checkpoints = []
    for model_index in range(settings.num_models):
        model = build_model()
        objective = None if make_objective is None else make_objective(model)
        for epoch, state in train_one(model, split, settings, seed + model_index, objective):
            path = folder / f"model{model_index}_epoch{epoch:04d}.safetensors"
            save_state_dict(state, path)
            checkpoints.append(Checkpoint(path, model_index, epoch, settings.lr))
    manifest = [
        {
            "file": c.path.name,
            "model_index": c.model_index,
            "epoch": c.epoch,
            "lr": c.lr,
            **_file_record(c.path),
        }
        for c in checkpoints
    ]
    folder.mkdir(parents=True, exist_ok=True)
    if manifest_path.is_dir() and not manifest_path.is_symlink():
        import shutil  # noqa: PLC0415

        shutil.rmtree(manifest_path)
    text = json.dumps(manifest, indent=1)
    atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(text))
    return checkpoints


def _tensor_shapes(path: Path) -> Dict[str, List[int]]:
    """Name -> shape of every tensor in a safetensors file (reads the header only)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), "pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in sorted(handle.keys())}


def _file_record(path: Path) -> Dict[str, Any]:
    """What the manifest records of a checkpoint file, to check it on every read."""
    return {"sha256": file_sha256(path), "shapes": _tensor_shapes(path)}


def _verified_checkpoints(folder: Path, manifest_path: Path) -> tuple[List[Checkpoint], Optional[str]]:
    """The cached checkpoints, or ``([], reason)`` when the manifest or a file does not check out."""
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [
            (str(c["file"]), int(c["model_index"]), int(c["epoch"]), float(c["lr"]), c["sha256"], c["shapes"])
            for c in manifest
        ]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        return [], f"manifest.json is unreadable or incomplete ({type(exc).__name__})"
    if not entries:
        return [], "manifest.json lists no checkpoints"
    checkpoints = []
    for file, model_index, epoch, lr, sha256, shapes in entries:
        path = folder / file
        if Path(file).name != file or not path.is_file():
            return [], f"{file} is missing"
        if file_sha256(path) != sha256:
            return [], f"{file} does not match its recorded SHA-256 (truncated or replaced)"
        try:
            if _tensor_shapes(path) != shapes:
                return [], f"{file} holds tensors of other shapes than recorded"
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a miss
            return [], f"{file} cannot be read ({type(exc).__name__})"
        checkpoints.append(Checkpoint(path, model_index, epoch, lr))
    return checkpoints, None
