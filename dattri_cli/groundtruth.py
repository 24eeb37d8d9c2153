"""Ground truth by retraining: what actually happens to the test losses when the data change.

``dattri groundtruth`` composes the same config as ``dattri run`` (groups dataset,
model, train and any override) and retrains the model with the same recipe
(:func:`~dattri_cli.models.train.train_one`) on

* ``num_subsets`` random subsets holding a fraction ``alpha`` of the training set
  (for LDS), and
* the full training set minus one sample, for each position in ``loo`` (for LOO),
  plus the full training set itself (the LOO baseline),

recording the test cross-entropy of every test sample, averaged over
``seeds_per_subset`` retrainings. Retraining ``r`` of every job uses seed
``seed + r`` (common random numbers: subsets differ in their data, not in their
initialisation). Labels flipped by ``dataset.label_noise`` are recorded.

Each retraining is one job whose result is written to ``work_dir`` as soon as it
finishes; a rerun skips finished jobs, so a killed job resumes. Jobs run in a pool
of ``workers`` processes, each single-threaded, so the merged file is identical
whatever the parallelism.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

import dattri_cli
from dattri_cli import builders, progress
from dattri_cli.data import Split
from dattri_cli.errors import ConfigError, DattriError
from dattri_cli.io import atomic_write, check_writable, read_tensor_file, write_tensor_file

log = logging.getLogger("dattri_cli")

KIND = "groundtruth"
# train settings that change how many models a run uses, not what one retraining learns
RUN_ONLY_TRAIN_KEYS = ("num_models", "save_every")
SETTING_KEYS = (
    "num_subsets",
    "alpha",
    "seeds_per_subset",
    "seed",
    "loo",
    "workers",
    "work_dir",
    "out",
    "max_jobs",
)
# settings that never change the result (left out of the metadata)
_EXECUTION_KEYS = ("workers", "work_dir", "out", "max_jobs")


@dataclass
class GroundTruthSettings:
    """What to retrain (``num_subsets``, ``alpha``, ``seeds_per_subset``, ``seed``, ``loo``) and how."""

    num_subsets: int = 50
    alpha: float = 0.5
    seeds_per_subset: int = 1
    seed: int = 0
    loo: List[int] = field(default_factory=list)  # row positions in the training set
    workers: int = 1
    work_dir: Optional[str] = None  # default: <out>.parts
    out: str = "groundtruth.safetensors"
    max_jobs: Optional[int] = None  # run at most this many retrainings now, merge later

    def check(self, n_train: int) -> None:
        """Refuse values that cannot work, naming the setting."""
        if self.num_subsets < 0 or self.seeds_per_subset < 1 or self.workers < 1:
            msg = "num_subsets must be >= 0, seeds_per_subset >= 1 and workers >= 1"
            raise ConfigError(msg)
        if not 0.0 < self.alpha < 1.0 or round(self.alpha * n_train) < 1:
            msg = f"alpha must be in (0, 1) and keep at least one of {n_train} training samples, got {self.alpha}"
            raise ConfigError(msg)
        bad = [i for i in self.loo if not 0 <= i < n_train]
        if bad:
            msg = f"loo positions {bad} are outside the training set (0..{n_train - 1})"
            raise ConfigError(msg)
        if self.num_subsets == 0 and not self.loo:
            msg = "nothing to retrain: set num_subsets > 0 or give loo=[positions]"
            raise ConfigError(msg)

    def result_settings(self) -> Dict[str, Any]:
        """The settings that determine the result (for metadata and the work-dir manifest)."""
        return {k: v for k, v in asdict(self).items() if k not in _EXECUTION_KEYS}


@dataclass(frozen=True)
class Job:
    """One retraining: which kind (subset / loo / full), which one, which repeat."""

    kind: str
    index: int
    repeat: int

    @property
    def name(self) -> str:
        """File stem of this job's result in the work dir."""
        return f"{self.kind}{self.index:05d}_r{self.repeat:02d}"


def groundtruth_key(cfg: Mapping[str, Any]) -> str:
    """Hash of what a retraining depends on: dataset, model and train (less ensemble keys).

    A score file belongs to a ground truth when the same function of its recorded
    config gives the same key, whatever the attributor, loader or ensemble size.
    """
    train = {k: v for k, v in dict(cfg["train"]).items() if k not in RUN_ONLY_TRAIN_KEYS}
    return builders.config_hash(
        {"dataset": dict(cfg["dataset"]), "model": dict(cfg["model"]), "train": train}
    )


def draw_subsets(n_train: int, settings: GroundTruthSettings) -> Tensor:
    """``(num_subsets, round(alpha * n_train))`` sorted row positions, seeded by ``settings.seed``."""
    size = round(settings.alpha * n_train)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = [
        torch.randperm(n_train, generator=generator)[:size].sort().values for _ in range(settings.num_subsets)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, size, dtype=torch.int64)


def jobs_for(settings: GroundTruthSettings) -> List[Job]:
    """Every retraining, in a fixed order."""
    repeats = range(settings.seeds_per_subset)
    jobs = [Job("subset", m, r) for m in range(settings.num_subsets) for r in repeats]
    if settings.loo:
        jobs += [Job("full", 0, r) for r in repeats]
        jobs += [Job("loo", i, r) for i in range(len(settings.loo)) for r in repeats]
    return jobs


def _members(job: Job, n_train: int, subsets: Tensor, loo: List[int]) -> Tensor:
    """Training rows a job trains on."""
    if job.kind == "subset":
        return subsets[job.index]
    keep = torch.ones(n_train, dtype=torch.bool)
    if job.kind == "loo":
        keep[loo[job.index]] = False
    return keep.nonzero().flatten()


def per_sample_targets(model: torch.nn.Module, x: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    """The run's target function (test cross-entropy) on each test sample, as a batch of one."""
    from dattri_cli.models.train import make_loss_funcs  # noqa: PLC0415

    _, target_func = make_loss_funcs(model, weight_decay, x.dim() - 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        values = [target_func(params, (x[j : j + 1], y[j : j + 1])) for j in range(x.shape[0])]
    return torch.stack(values).to(torch.float32)


def run_job(cfg: Dict[str, Any], settings: GroundTruthSettings, job: Job, work_dir: str) -> str:
    """Retrain for one job, single-threaded, and save its per-test targets atomically."""
    from dataclasses import replace  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415

    from dattri_cli.models.train import TrainSettings, train_one  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic in the pool and in-process
    try:
        split = builders.build_split(cfg)
        n_train = int(split.y_train.shape[0])
        rows = _members(job, n_train, draw_subsets(n_train, settings), settings.loo)
        part = replace(
            split,
            x_train=split.x_train[rows],
            y_train=split.y_train[rows],
            train_indices=split.train_indices[rows],
        )
        train_settings = TrainSettings(**cfg["train"])
        model = builders.model_factory(cfg, split, "cpu")()
        train_one(model, part, train_settings, settings.seed + job.repeat)
        targets = per_sample_targets(model, split.x_test, split.y_test, train_settings.weight_decay)
    finally:
        torch.set_num_threads(threads)
    path = Path(work_dir) / f"{job.name}.safetensors"
    atomic_write(path, lambda tmp: save_file({"targets": targets.contiguous()}, tmp))
    return job.name


def _prepare_work_dir(work_dir: Path, manifest: Dict[str, Any]) -> None:
    """Create ``work_dir`` or check it belongs to this ground truth (so resuming is safe)."""
    path = work_dir / "manifest.json"
    text = json.dumps(manifest, sort_keys=True, indent=1)
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(text):
            msg = (
                f"work dir {work_dir} holds retrainings of a different config or settings; delete it "
                "or set work_dir= elsewhere"
            )
            raise DattriError(msg)
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _run_pending(
    cfg: Dict[str, Any], settings: GroundTruthSettings, pending: List[Job], work_dir: Path
) -> Iterator[str]:
    """Run jobs in-process (one worker) or in a spawn pool; yield each name as it finishes."""
    if settings.workers == 1 or len(pending) <= 1:
        for job in pending:
            yield run_job(cfg, settings, job, str(work_dir))
        return
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import as_completed  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=settings.workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, cfg, settings, job, str(work_dir)) for job in pending]
        for future in as_completed(futures):
            yield future.result()


def _load_part(work_dir: Path, job: Job) -> Tensor:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(work_dir / f"{job.name}.safetensors"))["targets"].to(torch.float64)


def _mean_targets(work_dir: Path, kind: str, count: int, repeats: int) -> Tensor:
    """``(count, n_test)`` targets of one kind, averaged over repeats in a fixed order."""
    rows = []
    for index in range(count):
        parts = [_load_part(work_dir, Job(kind, index, r)) for r in range(repeats)]
        rows.append(torch.stack(parts).mean(dim=0))
    return torch.stack(rows).to(torch.float32)


def merge(
    work_dir: Path,
    settings: GroundTruthSettings,
    subsets: Tensor,
    split: Any,
    flips: Tensor,
    metadata: Dict[str, Any],
) -> Dict[str, Tensor]:
    """Assemble the ground-truth tensors from the finished jobs."""
    reps = settings.seeds_per_subset
    n_test = int(split.y_test.shape[0])
    tensors = {
        "subsets": subsets.to(torch.int64).contiguous(),
        "targets": _mean_targets(work_dir, "subset", settings.num_subsets, reps)
        if settings.num_subsets
        else torch.zeros(0, n_test),
        "train_indices": split.train_indices.to(torch.int64).contiguous(),
        "test_indices": split.test_indices.to(torch.int64).contiguous(),
    }
    if settings.loo:
        tensors["loo_indices"] = torch.tensor(settings.loo, dtype=torch.int64)
        tensors["loo_targets"] = _mean_targets(work_dir, "loo", len(settings.loo), reps)
        tensors["full_targets"] = _mean_targets(work_dir, "full", 1, reps)[0]
    if metadata["label_noise"]["fraction"]:
        tensors["flipped"] = flips.to(torch.int64).contiguous()
    return tensors


def generate(cfg: Mapping[str, Any], settings: GroundTruthSettings) -> Optional[Path]:
    """Run every unfinished retraining, then write the merged file; None if ``max_jobs`` stopped early."""

    from dattri_cli.schema import validate_run  # noqa: PLC0415

    resolved = validate_run(builders.to_dict(cfg))  # every value, before any data is loaded
    progress.set_mode(resolved.get("progress", "off"))
    out = Path(settings.out).expanduser()
    check_writable(out, overwrite=bool(resolved.get("overwrite", True)))
    split, flips = builders.build_split_and_flips(resolved)
    if builders.task_name(resolved) != builders.DEFAULT_TASK or not isinstance(split, Split):
        msg = (
            "dattri groundtruth retrains on in-memory (x, y) data with task=classification; "
            f"task={builders.task_name(resolved)} on {type(split).__name__} is not supported yet"
        )
        raise ConfigError(msg)
    n_train = int(split.y_train.shape[0])
    settings.check(n_train)
    subsets = draw_subsets(n_train, settings)
    dataset = resolved["dataset"]
    metadata = {
        "kind": KIND,
        "groundtruth_key": groundtruth_key(resolved),
        "run_config_hash": builders.config_hash(resolved),
        "config": {k: resolved[k] for k in ("dataset", "model", "train")},
        "settings": settings.result_settings(),
        "target": "test cross-entropy per test sample (make_loss_funcs target), mean over seeds_per_subset retrainings",
        "training_seeds": [settings.seed + r for r in range(settings.seeds_per_subset)],
        "label_noise": {
            "fraction": float(dataset.get("label_noise", 0.0) or 0.0),
            "seed": int(dataset.get("label_noise_seed", 0) or 0),
            "flipped": int(flips.sum()),
        },
        "versions": {"dattri_cli": dattri_cli.__version__, "torch": torch.__version__},
    }
    work_dir = (
        Path(settings.work_dir).expanduser() if settings.work_dir else out.with_name(out.name + ".parts")
    )
    _prepare_work_dir(work_dir, {k: metadata[k] for k in ("groundtruth_key", "settings", "label_noise")})
    pending = [j for j in jobs_for(settings) if not (work_dir / f"{j.name}.safetensors").is_file()]
    total = len(jobs_for(settings))
    if pending:
        log.info("ground truth: %d of %d retrainings to run in %s", len(pending), total, work_dir)
    limit = pending if settings.max_jobs is None else pending[: settings.max_jobs]
    for _ in progress.track(
        _run_pending(resolved, settings, limit, work_dir), "retraining", total=len(limit)
    ):
        pass
    if len(limit) < len(pending):
        return None
    tensors = merge(work_dir, settings, subsets, split, flips, metadata)
    write_tensor_file(out, tensors, metadata)
    return out


def load_groundtruth(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a ground-truth file: its tensors and decoded metadata."""
    tensors, meta = read_tensor_file(path, "ground-truth file")
    meta = meta or {}
    if meta.get("kind") != KIND or "targets" not in tensors:
        msg = f"{path} is not a dattri-cli ground-truth file; make one with `dattri groundtruth`"
        raise DattriError(msg)
    return tensors, meta


# ----------------------------------------------------------------- command line


def split_args(args: List[str]) -> Tuple[GroundTruthSettings, List[str], bool]:
    """Separate ``KEY=VALUE`` ground-truth settings from config overrides; note ``--cfg``.

    Values are read as YAML, so ``loo=[0,5,9]``, ``alpha=0.3`` and ``work_dir=null`` work;
    paths (``out``, ``work_dir``) are taken as written. Every setting is checked against
    :data:`dattri_cli.schema.GROUNDTRUTH_SETTINGS` here, before anything is composed or loaded.
    """
    from dattri_cli.schema import GROUNDTRUTH_SETTINGS, validate_settings, yaml_value  # noqa: PLC0415

    values: Dict[str, Any] = {}
    overrides = []
    show_cfg = False
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg in {"--cfg", "--cfg=job"}:
            show_cfg = True
        elif sep and key in SETTING_KEYS:
            if key == "out" or (key == "work_dir" and value not in {"null", "~", ""}):
                values[key] = value
            else:
                values[key] = yaml_value(value)
        else:
            overrides.append(arg)
    if "loo" in values and not isinstance(values["loo"], list):
        values["loo"] = [values["loo"]]
    validate_settings("groundtruth", values, GROUNDTRUTH_SETTINGS)
    if "loo" in values:
        values["loo"] = [int(i) for i in values["loo"]]
    return GroundTruthSettings(**values), overrides, show_cfg


def compose(overrides: List[str], validate: bool = True) -> Any:
    """The ``dattri run`` config with the same overrides, composed and checked like the command line."""
    from dattri_cli.precheck import compose_checked  # noqa: PLC0415

    return compose_checked(overrides, validate=validate)


HELP = """usage: dattri groundtruth [SETTING=VALUE ...] [RUN OVERRIDES ...] [--cfg]

Retrain the configured model (same groups and overrides as `dattri run`) on random
subsets of the training set and record every test sample's loss: the ground truth that
`dattri eval` scores attributions against. Resumable (finished retrainings are kept in
<out>.parts/) and parallel (workers=N); the file is identical whatever the parallelism.

settings: num_subsets (50), alpha (0.5), seeds_per_subset (1), seed (0), loo=[i,j,...],
          workers (1), work_dir, max_jobs, out (groundtruth.safetensors)

examples:
  dattri groundtruth model=lr num_subsets=50 workers=2 out=gt_lr.safetensors
  dattri groundtruth model=mlp dataset.n_train=500 loo=[0,1,2] out=gt_mlp.safetensors
  dattri groundtruth dataset.label_noise=0.1 out=gt_noisy.safetensors
  dattri groundtruth model=lr --cfg          # print the composed config and settings only
"""


def main(args: List[str]) -> None:
    """``dattri groundtruth [KEY=VALUE ...]``: settings and run-config overrides mixed."""
    if any(a in {"-h", "--help"} for a in args):
        print(HELP)
        return
    settings, overrides, show_cfg = split_args(args)
    cfg = compose(overrides, validate=not show_cfg)
    if show_cfg:
        from omegaconf import OmegaConf  # noqa: PLC0415

        print(OmegaConf.to_yaml(cfg))
        print(json.dumps(asdict(settings), indent=1))
        return
    out = generate(cfg, settings)
    if out is None:
        print(f"stopped after max_jobs={settings.max_jobs}; run the same command again to continue")
    else:
        print(f"ground truth written to {out}")


__all__ = ["GroundTruthSettings", "Job", "generate", "groundtruth_key", "load_groundtruth", "main"]
