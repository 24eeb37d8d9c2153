"""``run(cfg)``: one call per stage, config -> objects -> scores over rows -> files. No Hydra globals here.

The Hydra app composes the config and calls :func:`run`; tests call it with a
config composed through the Compose API. The stages live in their own modules:
:mod:`~dattri_cli.schema` checks every value, :mod:`~dattri_cli.builders` turns the
config into objects (split, model, checkpoints, task, attributor),
:mod:`~dattri_cli.runner` plans the rows and scores them through the attributor
contract, :mod:`~dattri_cli.io` writes the score files, their metadata and the
sidecar. Everything a score file depends on is recorded in its metadata, and a hash
of it identifies results that belong together.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from omegaconf import DictConfig

from dattri_cli import builders, distributed, io, memory, progress, runner, schema
from dattri_cli.builders import NON_RESULT_KEYS
from dattri_cli.data.protocol import n_test, n_train
from dattri_cli.errors import ConfigError
from dattri_cli.models.train import TrainSettings

__all__ = ["NON_RESULT_KEYS", "RunResult", "run"]


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


@contextlib.contextmanager
def _timed(timings: Dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


@dataclass
class _Setup:
    """Where the run writes and on what it runs, checked before any data is loaded."""

    out: Path
    device: str
    rank: int
    world: int
    rows_per_file: Optional[int]
    overwrite: bool


def _setup(resolved: Mapping[str, Any], output_dir: Optional[Path]) -> _Setup:
    try:
        progress.set_mode(resolved.get("progress", "off"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    out = Path(output_dir or ".") / "scores.safetensors"
    if resolved.get("out"):
        out = Path(resolved["out"]).expanduser()
    device = builders.check_device(distributed.local_device(str(resolved.get("device", "cpu"))))
    rank, world = distributed.init_from_env(device)
    shard_cfg = resolved.get("shard") or {}
    rows_per_file = runner.rows_per_file_setting(resolved.get("output"), shard_cfg, world)
    if shard_cfg.get("index") is not None or int(shard_cfg.get("count") or 1) > 1:
        out = io.shard_path(out, int(shard_cfg.get("index") or 0), int(shard_cfg.get("count") or 1))
    overwrite = bool(resolved.get("overwrite", True))
    io.check_writable(out, overwrite=overwrite)
    return _Setup(out, device, rank, world, rows_per_file, overwrite)


def _store_counts(timings: Dict[str, float], store_stats: Dict[str, Any]) -> None:
    """Feature-cache hits and misses, and the peak memory, into ``timings``."""
    if store_stats:
        timings["feature_cache_hits"] = sum(s.hits for stores in store_stats.values() for s in stores)
        timings["feature_cache_misses"] = sum(s.misses for stores in store_stats.values() for s in stores)
    timings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(
    cfg: DictConfig | Mapping[str, Any],
    output_dir: Optional[Path] = None,
    choices: Optional[Dict[str, str]] = None,
) -> RunResult:
    """Compose the task from ``cfg``, attribute, and write the score file(s)."""
    resolved = schema.validate_run(builders.to_dict(cfg))  # every value, before any work
    setup = _setup(resolved, output_dir)
    seed = int(resolved.get("seed", 0))
    timings: Dict[str, float] = {}

    with _timed(timings, "data_s"):
        split = builders.build_split(resolved)
        build_model = builders.model_factory(resolved, split, setup.device)
        model = build_model()
        settings = TrainSettings(**resolved["train"])
        attributor_cfg, run_opts = builders.split_runner(resolved["attributor"])
        # refuse what cannot fit, before training or loading checkpoints; may lower default batch sizes
        base = memory.resident_bytes()
        memory.record(timings, memory.guard(resolved, attributor_cfg, model, split), base)

    with _timed(timings, "checkpoints_s"):
        objective = builders.training_objective(resolved, split)
        all_ckpts = builders.acquire_checkpoints(
            resolved, build_model, split, settings, seed, setup.rank, objective
        )
        checkpoints = builders.select_checkpoints(all_ckpts, run_opts.get("checkpoints", "final"))

    functions, loss_record = builders.task_functions(resolved, model, split, settings)
    task = builders.build_task(
        model, checkpoints, settings, split, functions, resolved.get("checkpoint_prefix")
    )
    attributor = builders.build_attributor(
        attributor_cfg, run_opts, task, checkpoints, split, setup.device, functions
    )
    loader_cfg = resolved["loader"]
    loaders = split.loaders(loader_cfg["train_batch_size"], loader_cfg["test_batch_size"])
    batch_size = int(loader_cfg["train_batch_size"])
    plan = runner.plan_rows(resolved.get("shard"), n_train(split), batch_size, setup.rank, setup.world)
    hashes = builders.checkpoint_hashes(checkpoints)
    param_dtype = task.get_param(0)[0].dtype
    store_stats: Dict[str, Any] = {}
    if resolved.get("feature_cache", False) and attributor.uses_feature_store:
        attributor.feature_store = builders.feature_store_factory(
            Path(str(resolved["cache_dir"])) / "features",
            hashes,
            split,
            attributor,
            param_dtype,
            setup.device,
            store_stats,
            {
                "task": resolved.get("task"),
                "weight_decay": loss_record["weight_decay"],
                "checkpoint_prefix": resolved.get("checkpoint_prefix"),
            },
        )

    torch.manual_seed(seed)
    blocks = runner.plan_files(
        setup.rows_per_file,
        plan,
        batch_size,
        n_test(split),
        runner.score_bytes(attributor, param_dtype),
        runner.available_memory(),
    )
    if len(blocks) > 1:
        for block in blocks:  # before any heavy work
            io.check_writable(io.shard_path(setup.out, block.index, block.count), overwrite=setup.overwrite)
    make_metadata = functools.partial(
        _with_loss_record,
        loss_record,
        io.score_metadata,
        builders.result_config(resolved),
        builders.config_hash(resolved),
        attributor_cfg,
        run_opts,
        choices,
        checkpoints,
        hashes,
    )
    return _score_and_write(
        attributor,
        split,
        loaders,
        plan,
        blocks,
        setup,
        make_metadata,
        bool(run_opts.get("self_influence")),
        timings,
        store_stats,
    )


def _with_loss_record(record: Dict[str, Any], make: Any, *args: Any) -> Dict[str, Any]:
    """The score metadata plus ``loss``: the task and the L2 term used, and why."""
    return {**make(*args), "loss": dict(record)}


def _score_and_write(
    attributor: Any,
    split: Any,
    loaders: Any,
    plan: runner.RowPlan,
    blocks: List[runner.RowPlan],
    setup: _Setup,
    make_metadata: Any,
    with_self_influence: bool,
    timings: Dict[str, float],
    store_stats: Dict[str, Any],
) -> RunResult:
    """Score the blocks and write one file each (a single block: one file; rank 0 gathers under torchrun).

    The metadata and the self-influence are taken right after the first block's scores, where
    a single-file run takes them (same diagnostics, same random state); the self-influence
    is sliced per file.
    """
    train_loader = loaders[0]
    metadata: Dict[str, Any] = {}
    self_scores: Optional[torch.Tensor] = None
    paths: List[Path] = []
    first_column: List[torch.Tensor] = []
    for block, scores in runner.score_blocks(attributor, split, loaders, plan, blocks, timings):
        if block.mode == "rank":
            parts = distributed.gather_rows(scores)
            if setup.rank != 0:  # rank 0 writes the result
                return RunResult(setup.out, scores, {}, timings)
            scores = torch.cat(parts)
        if not metadata:
            metadata = make_metadata(attributor.diagnostics if attributor.has_diagnostics else {})
            if with_self_influence:
                self_scores = attributor.self_scores(train_loader).detach().to("cpu", torch.float32)
        rows = slice(0, None) if block.mode in ("full", "rank") else slice(block.start, block.stop)
        block_meta = metadata if block.mode in ("full", "rank") else {**metadata, "shard": block.metadata()}
        extra = {} if self_scores is None else {"self_influence": self_scores[rows]}
        path = setup.out if len(blocks) == 1 else io.shard_path(setup.out, block.index, block.count)
        io.save_scores(path, scores, split.train_indices[rows], split.test_indices, block_meta, extra)
        paths.append(path)
        if len(blocks) > 1:
            first_column.append(scores[:, 0].clone())
            del scores  # one block in memory at a time
    _store_counts(timings, store_stats)
    if len(blocks) > 1:
        io.write_run_sidecar(setup.out, [str(f) for f in paths], metadata["config_hash"], timings)
        return RunResult(paths[0], None, metadata, timings, paths, torch.cat(first_column))
    io.write_run_sidecar(setup.out, str(setup.out), metadata["config_hash"], timings)
    return RunResult(setup.out, scores, block_meta, timings, [setup.out])
