"""``run(cfg)``: build -> cache -> attribute -> save. No Hydra globals here.

The Hydra app composes the config and calls :func:`run`; tests call it with a
config composed through the Compose API. Everything the score file depends on is
recorded in its metadata, and a hash of it identifies results that belong together.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig

import dattri_cli
from dattri_cli import builders, distributed, progress, scale, schema
from dattri_cli.data import Split
from dattri_cli.errors import ConfigError, DataError, DattriError
from dattri_cli.io import check_writable, save_scores, shard_path, sidecar_path, write_sidecar
from dattri_cli.models.train import (
    Checkpoint,
    TrainSettings,
    correct_probability,
    make_loss_funcs,
    trained_checkpoints,
)
from dattri_cli.task import AttributionTask, load_state_dict_file

log = logging.getLogger("dattri_cli")

# keys of the run config that change how a run looks, never what it computes
# (shard.*: which rows a process scores; output.*: how the rows are laid out in files;
# feature_cache: whether train-side blocks are kept on disk)
NON_RESULT_KEYS = ("out", "progress", "overwrite", "cache_dir", "shard", "output", "feature_cache")
CHECKPOINT_CHOICES = ("final", "trajectory")
WEIGHT_CHOICES = ("ones", "learning_rates")


@dataclass
class RunResult:
    """What a run produced: the score file(s), the scores and the time per stage.

    A run that wrote its rows as several files (``output.rows_per_file``) lists them
    in ``files`` (``path`` is the first) and holds no ``scores``: read them with
    :func:`dattri_cli.io.open_score_set` or merge them. It keeps ``first_test_scores``
    (column 0, one value per training row) for the summary, which would otherwise
    read every file back.
    """

    path: Path
    scores: Optional[torch.Tensor]
    metadata: Dict[str, Any]
    timings: Dict[str, float] = field(default_factory=dict)
    files: List[Path] = field(default_factory=list)
    first_test_scores: Optional[torch.Tensor] = None


def config_hash(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the result-determining part of the resolved config."""
    relevant = {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def check_device(device: str) -> str:
    """Refuse a device this machine does not have, before any work."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        msg = f"device={device!r} is not a device name; use cpu, cuda, cuda:1 or mps"
        raise ConfigError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device} but this torch build sees no CUDA GPU; use device=cpu or install a CUDA build of torch"
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
    from dattri_cli.data.noise import NOISE_KEYS, flip_labels  # noqa: PLC0415

    node = dict(cfg["dataset"])
    fraction = float(node.pop(NOISE_KEYS[0], 0.0) or 0.0)
    noise_seed = int(node.pop(NOISE_KEYS[1], 0) or 0)
    split = builders.build(node, "dataset")
    if not isinstance(split, Split):
        msg = f"dataset._target_ must return a dattri_cli.data.Split, got {type(split).__name__}"
        raise ConfigError(msg)
    return flip_labels(split, fraction, noise_seed)


def model_factory(cfg: Mapping[str, Any], split: Split, device: str) -> Any:
    """A zero-argument function building the configured model on ``device``."""
    runtime = {"in_features": split.num_features, "num_classes": split.num_classes}
    fixed = cfg["model"].get("num_classes")
    if isinstance(fixed, int) and not isinstance(fixed, bool) and split.num_classes > fixed:
        msg = (
            f"the labels go up to {split.num_classes - 1} but model.num_classes={fixed}; raise "
            "model.num_classes or leave it unset to use the data's"
        )
        raise DataError(msg)

    def build_model() -> torch.nn.Module:
        model = builders.build(cfg["model"], "model", runtime)
        if not isinstance(model, torch.nn.Module):
            msg = f"model._target_ must build a torch.nn.Module, got {type(model).__name__}"
            raise ConfigError(msg)
        return model.to(device)

    return build_model


def _user_checkpoints(spec: Any, lr: float) -> List[Checkpoint]:
    paths = spec if isinstance(spec, list) else [spec]
    out = []
    for i, p in enumerate(paths):
        path = Path(str(p)).expanduser()
        load_state_dict_file(path)  # fail now, with a clear message, if unreadable
        out.append(Checkpoint(path, i, 0, lr))
    return out


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


def run_cache(attributor: Any, loader: Any, timings: Dict[str, float]) -> None:
    """``cache(loader)``, or ``cache()`` for TracIn, timed into ``timings["cache_s"]``."""
    start = time.perf_counter()
    if inspect.signature(attributor.cache).parameters:
        attributor.cache(loader)
    else:
        attributor.cache()
    timings["cache_s"] = time.perf_counter() - start


def call_attributor(
    attributor: Any, train_loader: Any, test_loader: Any, timings: Dict[str, float]
) -> torch.Tensor:
    """Run ``cache`` and ``attribute`` whatever their signature in the reference API."""
    run_cache(attributor, train_loader, timings)
    start = time.perf_counter()
    first = next(iter(inspect.signature(attributor.attribute).parameters))
    if first == "test_dataloader":  # TRAK: the training set was cached
        scores = attributor.attribute(test_loader)
    else:
        scores = attributor.attribute(train_loader, test_loader)
    timings["attribute_s"] = time.perf_counter() - start
    return scores


def self_influence(attributor: Any, train_loader: Any) -> torch.Tensor:
    """``attributor.self_attribute`` (diagonal of train x train), or a clear refusal."""
    method = getattr(attributor, "self_attribute", None)
    if method is None:
        msg = f"{type(attributor).__name__} has no self_attribute; drop attributor.runner.self_influence"
        raise ConfigError(msg)
    return method(train_loader).detach().to("cpu", torch.float32)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
        return _user_checkpoints(resolved["checkpoint"], settings.lr)
    key_parts = {"dataset": resolved["dataset"], "model": resolved["model"]}
    if rank != 0:  # rank 0 trains (or finds) the checkpoints; the others then find them cached
        distributed.barrier()
    checkpoints = trained_checkpoints(
        build_model, split, settings, seed, Path(resolved["cache_dir"]), key_parts
    )
    if rank == 0:
        distributed.barrier()
    return checkpoints


def build_metadata(
    resolved: Mapping[str, Any],
    attributor_cfg: Mapping[str, Any],
    runner: Mapping[str, Any],
    choices: Optional[Dict[str, str]],
    checkpoints: List[Checkpoint],
    checkpoint_hashes: List[str],
    attributor: Any,
) -> Dict[str, Any]:
    """Everything the score file depends on, for its single metadata key."""
    return {
        "attributor": {
            "target": attributor_cfg["_target_"],
            "kwargs": {k: v for k, v in attributor_cfg.items() if not k.startswith("_")},
            "runner": dict(runner),
        },
        "choices": choices or {},
        "config": {k: v for k, v in resolved.items() if k not in NON_RESULT_KEYS},
        "config_hash": config_hash(resolved),
        "seed": int(resolved.get("seed", 0)),
        "versions": {"dattri_cli": dattri_cli.__version__, "torch": torch.__version__},
        "checkpoints": [
            {"file": c.path.name, "sha256": h, "model_index": c.model_index, "epoch": c.epoch}
            for c, h in zip(checkpoints, checkpoint_hashes)
        ],
        "diagnostics": _jsonable(getattr(attributor, "diagnostics", {})),
    }


def write_row_blocks(
    attributor: Any,
    split: Split,
    loaders: Tuple[Any, Any],
    blocks: List[scale.RowPlan],
    out: Path,
    make_metadata: Callable[[], Dict[str, Any]],
    with_self_influence: bool,
    timings: Dict[str, float],
) -> Tuple[List[Path], Dict[str, Any], torch.Tensor]:
    """Cache once on the full training set, then score, write and free one block of rows at a time.

    Each file is exactly the shard file ``shard.index=i shard.count=len(blocks)`` would
    write. The test side is computed on the first block and kept (per checkpoint) for
    the others. The metadata and self-influence are taken right after the first block,
    where a single-file run takes them (same diagnostics, same random state); the
    self-influence is sliced per file. Returns the files, the run's metadata and the
    scores of test column 0.
    """
    train_loader, test_loader = loaders
    n_train = split.x_train.shape[0]
    scale.align_row_offset(attributor, scale.RowPlan(0, 1, 0, n_train, n_train, "full"))
    run_cache(attributor, train_loader, timings)
    timings["attribute_s"] = 0.0
    metadata: Dict[str, Any] = {}
    self_scores: Optional[torch.Tensor] = None
    paths, first_column = [], []
    with scale.remember_test_side(attributor):
        for block in blocks:
            start = time.perf_counter()
            rows_loader = scale.row_loader(split, block.start, block.stop, train_loader.batch_size)
            scores = (
                scale.score_rows(attributor, rows_loader, test_loader, block)
                .detach()
                .to("cpu", torch.float32)
            )
            timings["attribute_s"] += time.perf_counter() - start
            if not metadata:
                metadata = make_metadata()
                self_scores = self_influence(attributor, train_loader) if with_self_influence else None
            extra = {} if self_scores is None else {"self_influence": self_scores[block.start : block.stop]}
            paths.append(shard_path(out, block.index, block.count))
            train_indices = split.train_indices[block.start : block.stop]
            save_scores(
                paths[-1],
                scores,
                train_indices,
                split.test_indices,
                {**metadata, "shard": block.metadata()},
                extra,
            )
            first_column.append(scores[:, 0].clone())
            del scores  # one block in memory at a time
    return paths, metadata, torch.cat(first_column)


def finish_run(
    out: Path, written: Any, config_hash_value: str, timings: Dict[str, float], store_stats: Dict[str, Any]
) -> None:
    """Feature-cache counts and peak memory into ``timings``, then the sidecar ``NAME.run.json`` beside ``out``."""
    if store_stats:
        timings["feature_cache_hits"] = sum(s.hits for stores in store_stats.values() for s in stores)
        timings["feature_cache_misses"] = sum(s.misses for stores in store_stats.values() for s in stores)
    timings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {
        "scores": written,
        "timings": timings,
        "host": platform.node(),
        "finished_unix": time.time(),
        "config_hash": config_hash_value,
    }
    try:
        write_sidecar(sidecar_path(out), info)
    except DattriError as exc:
        what = (
            f"{out} is complete"
            if isinstance(written, str)
            else f"all {len(written)} row-block files are complete"
        )
        msg = f"the scores were written ({what}) but the sidecar was not: {exc}"
        raise DattriError(msg) from exc


def run(
    cfg: DictConfig | Mapping[str, Any],
    output_dir: Optional[Path] = None,
    choices: Optional[Dict[str, str]] = None,
) -> RunResult:
    """Compose the task from ``cfg``, attribute, and write the score file."""
    resolved = schema.validate_run(builders.to_dict(cfg))  # every value, before any work
    try:
        progress.set_mode(resolved.get("progress", "off"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    out = (
        Path(resolved["out"]).expanduser()
        if resolved.get("out")
        else Path(output_dir or ".") / "scores.safetensors"
    )
    device = check_device(distributed.local_device(str(resolved.get("device", "cpu"))))
    rank, world = distributed.init_from_env(device)
    shard_cfg = resolved.get("shard") or {}
    rows_per_file = scale.rows_per_file_setting(resolved.get("output"), shard_cfg, world)
    if shard_cfg.get("index") is not None or int(shard_cfg.get("count") or 1) > 1:
        out = shard_path(out, int(shard_cfg.get("index") or 0), int(shard_cfg.get("count") or 1))
    check_writable(out, overwrite=bool(resolved.get("overwrite", True)))
    seed = int(resolved.get("seed", 0))
    timings: Dict[str, float] = {}

    start = time.perf_counter()
    split = build_split(resolved)
    build_model = model_factory(resolved, split, device)
    model = build_model()
    settings = TrainSettings(**resolved["train"])
    attributor_cfg, runner = builders.split_runner(resolved["attributor"])
    timings["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    all_ckpts = acquire_checkpoints(resolved, build_model, split, settings, seed, rank)
    checkpoints = select_checkpoints(all_ckpts, runner.get("checkpoints", "final"))
    timings["checkpoints_s"] = time.perf_counter() - start

    sample_ndim = split.x_train.dim() - 1  # one sample's input dimensions (dattri's per-sample calls)
    loss_func, target_func = make_loss_funcs(model, settings.weight_decay, sample_ndim)
    task = AttributionTask(loss_func, model, [str(c.path) for c in checkpoints], target_func=target_func)
    task.get_param(0)  # load the first checkpoint now: a mismatch fails before any heavy work
    runtime = {
        "task": task,
        "device": device,
        "weight_list": checkpoint_weights(checkpoints, runner.get("weights", "ones")),
        "correct_probability_func": correct_probability(model, sample_ndim),
        "final_linear_layer_name": getattr(model, "final_layer", None),
    }
    attributor = builders.build(attributor_cfg, "attributor", runtime)
    loader_cfg = resolved["loader"]
    train_loader, test_loader = split.loaders(loader_cfg["train_batch_size"], loader_cfg["test_batch_size"])
    plan = scale.plan_rows(
        shard_cfg, split.x_train.shape[0], int(loader_cfg["train_batch_size"]), rank, world
    )
    checkpoint_hashes = [_file_sha256(c.path) for c in checkpoints]
    store_stats: Dict[str, Any] = {}
    if resolved.get("feature_cache", False) and hasattr(attributor, "feature_store"):
        attributor.feature_store = scale.store_factory(
            Path(str(resolved["cache_dir"])) / "features",
            checkpoint_hashes,
            split,
            getattr(attributor, "layer_name", None),
            task.get_param(0)[0].dtype,
            device,
            store_stats,
        )

    torch.manual_seed(seed)
    blocks = scale.plan_files(
        rows_per_file,
        plan,
        int(loader_cfg["train_batch_size"]),
        int(split.test_indices.numel()),
        scale.score_bytes(attributor, task.get_param(0)[0].dtype),
        scale.available_memory(),
    )
    make_metadata = functools.partial(
        build_metadata, resolved, attributor_cfg, runner, choices, checkpoints, checkpoint_hashes, attributor
    )
    if len(blocks) > 1:
        for block in blocks:  # before any heavy work
            check_writable(
                shard_path(out, block.index, block.count), overwrite=bool(resolved.get("overwrite", True))
            )
        files, metadata, first_test_scores = write_row_blocks(
            attributor,
            split,
            (train_loader, test_loader),
            blocks,
            out,
            make_metadata,
            bool(runner.get("self_influence")),
            timings,
        )
        finish_run(out, [str(f) for f in files], metadata["config_hash"], timings, store_stats)
        return RunResult(files[0], None, metadata, timings, files, first_test_scores)
    if not plan.partial:
        scores = call_attributor(attributor, train_loader, test_loader, timings)
    else:
        rows_loader = scale.row_loader(split, plan.start, plan.stop, int(loader_cfg["train_batch_size"]))
        if plan.mode == "shard":  # the full training set for cache(), our rows for attribute()
            scores = scale.attribute_rows(attributor, train_loader, rows_loader, test_loader, plan, timings)
        else:  # torchrun: each rank caches its rows; full-set sums are all-reduced
            scale.check_distributable(attributor)
            with distributed.split_reductions():
                scores = scale.attribute_rows(
                    attributor, rows_loader, rows_loader, test_loader, plan, timings
                )
    scores = scores.detach().to("cpu", torch.float32)
    if plan.mode == "rank":
        parts = distributed.gather_rows(scores)
        if rank != 0:  # rank 0 writes the result
            return RunResult(out, scores, {}, timings)
        scores = torch.cat(parts)

    metadata = make_metadata()
    train_indices = split.train_indices
    extra = {}
    if runner.get("self_influence"):  # for `dattri eval` mislabel detection
        extra["self_influence"] = self_influence(attributor, train_loader)
    if plan.mode == "shard":
        metadata["shard"] = plan.metadata()
        train_indices = train_indices[plan.start : plan.stop]
        extra = {k: v[plan.start : plan.stop] for k, v in extra.items()}
    save_scores(out, scores, train_indices, split.test_indices, metadata, extra)
    finish_run(out, str(out), metadata["config_hash"], timings, store_stats)
    return RunResult(out, scores, metadata, timings, [out])
