"""The memory guard: estimate a run's peak memory (and feature-cache disk) before heavy work.

Why: at millions of parameters the cost of an attribution run is set by a few
parameter-sized objects, and a run that cannot fit should say so at once, with the
number and the override that fixes it, instead of swapping for minutes and being
killed. The estimates are deliberately simple products of the sizes that dominate:

* per-sample gradients: ``batch x P x itemsize`` for the vmapped gradients, times
  :data:`GRAD_WORK_FACTOR` for the per-sample intermediates ``vmap`` keeps;
* the test side an inner-product attributor keeps across row blocks: ``n_test x P``
  gradients and their transform (:data:`TEST_SIDE_COPIES` copies);
* the explicit Hessian: ``P^2`` in the parameter dtype per batch, plus the float64
  sum, its symmetrised copy and the Cholesky / LU factor (``P^2 x (itemsize + 24)``);
* CG / LiSSA: their row chunks, ``min(n_test, rows per chunk) x P x`` the solver's
  working vectors (:mod:`dattri_cli.func.ihvp` chunks them under a fixed budget);
* Arnoldi: its float64 Krylov basis, ``(max_iter + 1) x P x 8``;
* EK-FAC / K-FAC: per layer the float64 factors, their eigenvectors and the
  corrected eigenvalues, ``(in^2 + out^2) x 8 x 2 + in x out x 8 x 2``;
* on disk, with ``feature_cache=true``: the training rows' stored representations
  (``n_train x width x 4`` per checkpoint: ``P`` for unprojected gradients,
  ``proj_dim`` for TRAK) and the explicit Hessian (``P^2 x 8``).

:func:`check` refuses (one-line :class:`~dattri_cli.errors.ConfigError`) when the
peak exceeds :data:`MEMORY_FRACTION` of the available memory or the cache exceeds the
free disk; :func:`plan_batch_sizes` lowers loader batch sizes left at their default
when the per-sample gradient block would be too large. ``memory_guard=false``
turns both off. The score matrix itself is handled by the runner (row blocks).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from dattri_cli import builders, runner
from dattri_cli.errors import ConfigError
from dattri_cli.func import ihvp, kfac

log = logging.getLogger("dattri_cli")

#: the loader batch sizes of configs/run.yaml; only batch sizes left at this value are adapted
DEFAULT_BATCH_SIZE = 256
#: share of the available memory a run's estimated peak may take
MEMORY_FRACTION = 0.9
#: share of the available memory one per-sample gradient block may take before default batches shrink
BATCH_FRACTION = 0.25
#: per-sample gradients held per sample while ``vmap(grad)`` runs (the result and its intermediates)
GRAD_WORK_FACTOR = 3
#: copies of the ``(n_test, P)`` test side kept by inner-product attributors (gradients, transform)
TEST_SIDE_COPIES = 2
FLOAT64 = 8


def per_sample_grad_bytes(batch_size: int, num_params: int, itemsize: int = 4) -> int:
    """Working memory of one batch of vmapped per-sample gradients."""
    return int(batch_size) * int(num_params) * int(itemsize) * GRAD_WORK_FACTOR


def test_side_bytes(n_test: int, num_params: int, itemsize: int = 4) -> int:
    """The test gradients and their transform, kept for all row blocks."""
    return int(n_test) * int(num_params) * int(itemsize) * TEST_SIDE_COPIES


def explicit_hessian_bytes(num_params: int, itemsize: int = 4) -> int:
    """One batch's Hessian, the float64 sum, its symmetrised copy and the factor."""
    return int(num_params) ** 2 * (int(itemsize) + 3 * FLOAT64)


def solver_chunk_bytes(n_test: int, num_params: int, itemsize: int, vectors: int, budget: int) -> int:
    """CG / LiSSA working vectors of one row chunk (chunks are bounded by ``budget``, at least one row)."""
    row = int(num_params) * int(itemsize) * int(vectors)
    return min(int(n_test) * row, max(row, (int(budget) // row) * row))


def arnoldi_bytes(num_params: int, max_iter: int) -> int:
    """The float64 Krylov basis of the Arnoldi iteration."""
    return (int(max_iter) + 1) * int(num_params) * FLOAT64


def kfac_factor_bytes(layers: Iterable[Tuple[int, int]]) -> int:
    """Float64 factors, eigenvectors and corrected eigenvalues of layers given as ``(in[+1], out)``."""
    return sum((i * i + o * o) * FLOAT64 * 2 + i * o * FLOAT64 * 2 for i, o in layers)


def trak_width(proj_dim: int, proj_type: Optional[str], num_layers: int) -> int:
    """TRAK's feature width: ``proj_dim``, or ``proj_dim`` per layer with parameters for a Kronecker projection."""
    return proj_dim * max(1, num_layers) if proj_type == "kronecker" else proj_dim


def trak_kernel_bytes(width: int) -> int:
    """TRAK's ``width x width`` kernel with its eigendecomposition (eigenvectors and workspace): 3 float32 copies."""
    return 3 * width * width * 4


def feature_cache_bytes(n_train: int, width: int, num_checkpoints: int = 1, itemsize: int = 4) -> int:
    """Disk taken by the training rows' stored representations."""
    return int(n_train) * int(width) * int(itemsize) * int(num_checkpoints)


def size(num_bytes: float) -> str:
    """``1536 * 2**20`` -> ``"1.5 GiB"``."""
    for unit, unit_bytes in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= unit_bytes:
            return f"{num_bytes / unit_bytes:.1f} {unit}"
    return f"{num_bytes / 2**10:.1f} KiB"


@dataclass
class Estimate:
    """Bytes per component held at the peak, and on disk, with the fix for each."""

    memory: Dict[str, int] = field(default_factory=dict)
    disk: Dict[str, int] = field(default_factory=dict)
    fixes: Dict[str, str] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """The components are held together: their sum."""
        return sum(self.memory.values())

    @property
    def disk_total(self) -> int:
        """Bytes the feature cache writes."""
        return sum(self.disk.values())

    def largest(self, part: str = "memory") -> str:
        """The component that dominates memory (or disk)."""
        items = self.memory if part == "memory" else self.disk
        return max(items, key=lambda k: items[k])


@dataclass(frozen=True)
class Sizes:
    """What the estimates depend on."""

    num_params: int
    train_batch_size: int
    test_batch_size: int
    n_train: int
    n_test: int
    itemsize: int = 4
    num_checkpoints: int = 1


def _fits(bytes_per_sample: int, budget: float) -> int:
    """The largest power of two of samples whose block fits ``budget`` (at least 1)."""
    count = max(1, int(budget // max(1, bytes_per_sample)))
    return 2 ** int(math.floor(math.log2(count)))


def estimate(
    method: str,
    sizes: Sizes,
    options: Optional[Mapping[str, Any]] = None,
    budget: Optional[float] = None,
    feature_cache: bool = False,
) -> Estimate:
    """The peak-memory and disk estimate of attributor class ``method`` (e.g. ``"IFAttributorCG"``).

    ``options`` holds the attributor's settings that matter (``proj_dim``, ``max_iter``,
    ``kfac_layers`` as ``(in[+1], out)`` pairs); ``budget`` (bytes) sizes the batch
    sizes suggested in the fixes.
    """
    options = dict(options or {})
    p, item = sizes.num_params, sizes.itemsize
    est = Estimate()
    per_sample = per_sample_grad_bytes(1, p, item)
    suggest = budget if budget is not None else 0
    est.memory["train_gradients"] = per_sample_grad_bytes(sizes.train_batch_size, p, item)
    fit_train = _fits(per_sample, suggest * BATCH_FRACTION) if suggest else 1
    est.fixes["train_gradients"] = f"loader.train_batch_size={min(fit_train, sizes.train_batch_size)}"
    inner = method not in ("TRAKAttributor", "RPSAttributor", "IFAttributor")
    if method not in ("RPSAttributor", "IFAttributor"):
        est.memory["test_gradients"] = per_sample_grad_bytes(sizes.test_batch_size, p, item)
        fit_test = _fits(per_sample, suggest * BATCH_FRACTION) if suggest else 1
        est.fixes["test_gradients"] = f"loader.test_batch_size={min(fit_test, sizes.test_batch_size)}"
    if inner:  # the (n_test, P) test side is kept across row blocks
        est.memory["test_side"] = test_side_bytes(sizes.n_test, p, item)
        est.fixes["test_side"] = "fewer test rows (dataset.n_test) or a projected method (attributor=trak)"
    if method == "IFAttributorExplicit":
        est.memory["explicit_hessian"] = explicit_hessian_bytes(p, item)
        est.fixes["explicit_hessian"] = (
            "attributor=if_cg (Hessian-vector products, no P x P matrix) or attributor=if_ekfac"
        )
        if feature_cache:
            est.disk["cached_hessian"] = p * p * FLOAT64
    elif method in ("IFAttributorCG", "IFAttributorLiSSA"):
        vectors = ihvp.CG_VECTORS_PER_ROW if method == "IFAttributorCG" else ihvp.LISSA_VECTORS_PER_ROW
        est.memory["solver_chunk"] = solver_chunk_bytes(
            sizes.n_test, p, item, vectors, ihvp.CHUNK_BUDGET_BYTES
        )
        est.fixes["solver_chunk"] = "attributor=if_ekfac (no parameter-sized solver vectors)"
    elif method == "IFAttributorArnoldi":
        est.memory["arnoldi_basis"] = arnoldi_bytes(p, int(options.get("max_iter", 100)))
        est.fixes["arnoldi_basis"] = (
            "a smaller attributor.max_iter (the Krylov basis holds max_iter + 1 vectors)"
        )
    elif method == "TRAKAttributor":
        width = trak_width(
            int(options.get("proj_dim", 512)), options.get("proj_type"), int(options.get("num_layers", 1))
        )
        est.memory["trak_kernel"] = trak_kernel_bytes(width)
        est.fixes["trak_kernel"] = (
            "a smaller attributor.projector_kwargs.proj_dim (per layer with proj_type=kronecker)"
        )
    elif method in ("IFAttributorEKFAC", "IFAttributorKFAC"):
        est.memory["kfac_factors"] = kfac_factor_bytes(options.get("kfac_layers", ()))
        est.fixes["kfac_factors"] = "fewer layers (attributor.module_name)"
    if feature_cache and inner:  # raw training gradients, one row of P per sample
        est.disk["train_features"] = feature_cache_bytes(sizes.n_train, p, sizes.num_checkpoints, item)
    if feature_cache and method == "TRAKAttributor":
        width = trak_width(
            int(options.get("proj_dim", 512)), options.get("proj_type"), int(options.get("num_layers", 1))
        )
        est.disk["train_features"] = feature_cache_bytes(sizes.n_train, width, sizes.num_checkpoints, item)
    if est.disk:
        est.fixes["disk"] = "feature_cache=false (nothing stored; the train side is recomputed)"
    return est


def refusal(est: Estimate, available: int, what: str) -> Optional[str]:
    """The one-line refusal when ``est`` does not fit ``available`` memory (None when it does)."""
    if est.peak <= available * MEMORY_FRACTION:
        return None
    top = est.largest()
    parts = ", ".join(f"{k} {size(v)}" for k, v in sorted(est.memory.items(), key=lambda kv: -kv[1]) if v)
    return (
        f"{what} needs about {size(est.peak)} of memory ({parts}) but {size(available)} is available; "
        f"use {est.fixes.get(top, 'smaller batches')}, or memory_guard=false to run anyway"
    )


def disk_refusal(est: Estimate, free: int, where: str) -> Optional[str]:
    """The one-line refusal when the feature cache does not fit the free disk (None when it does)."""
    if not est.disk or est.disk_total <= free:
        return None
    return (
        f"the feature cache would write about {size(est.disk_total)} under {where} but {size(free)} is free; "
        f"use {est.fixes['disk']}, or memory_guard=false to run anyway"
    )


def plan_batch_sizes(
    num_params: int,
    requested: Mapping[str, int],
    budget: Optional[float],
    itemsize: int = 4,
    default: int = DEFAULT_BATCH_SIZE,
) -> Dict[str, int]:
    """Loader batch sizes: those left at ``default`` shrink (powers of two) until a per-sample
    gradient block takes at most :data:`BATCH_FRACTION` of ``budget``; explicit ones are kept."""
    out = dict(requested)
    if budget is None:
        return out
    limit = budget * BATCH_FRACTION
    for key, value in requested.items():
        if value == default and per_sample_grad_bytes(value, num_params, itemsize) > limit:
            out[key] = min(value, _fits(per_sample_grad_bytes(1, num_params, itemsize), limit))
    return out


def free_disk(path: Path) -> Optional[int]:
    """Free bytes on the file system holding ``path`` (its nearest existing parent), None if unknown."""
    path = Path(path).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _trainable(model: Any) -> Dict[str, Any]:
    """Trainable parameters by their first name (a tied weight once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _selected_params(method: str, cfg: Mapping[str, Any], model: Any) -> Tuple[Dict[str, Any], Tuple]:
    """The parameters whose per-sample gradients the attributor forms, and EK-FAC's ``(in[+1], out)`` layers."""
    params = _trainable(model)
    if method in ("IFAttributorEKFAC", "IFAttributorKFAC"):
        selection = kfac.select_layers(model, cfg.get("module_name"))
        layers = []
        for name in selection.modules:
            module = model.get_submodule(name)
            out = kfac.out_features(module)
            cols = module.weight.numel() // out + (1 if module.bias is not None else 0)
            layers.append((cols, out))
        return {n: params[n] for n in selection.param_names if n in params}, tuple(layers)
    layer_name = cfg.get("layer_name")
    if isinstance(layer_name, str):
        layer_name = [layer_name]
    if isinstance(layer_name, (list, tuple)):
        return {n: params[n] for n in layer_name if n in params}, ()
    return params, ()


def guard(resolved: Dict[str, Any], attributor_cfg: Mapping[str, Any], model: Any, split: Any) -> None:
    """Before checkpoints are trained or loaded: lower default loader batch sizes that would not fit,
    then refuse a run whose estimated peak memory or feature cache does not fit.

    ``resolved["loader"]`` is updated in place (so the score file records the sizes
    used). Does nothing with ``memory_guard=false``.
    """
    if not resolved.get("memory_guard", True):
        return
    cls = builders.resolve_target(attributor_cfg, "attributor")
    method = cls.__name__
    params, layers = _selected_params(method, attributor_cfg, model)
    num_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size() if params else 4
    available = runner.available_memory()
    loader = resolved["loader"]
    requested = {k: int(loader[k]) for k in ("train_batch_size", "test_batch_size")}
    planned = plan_batch_sizes(num_params, requested, available, itemsize)
    if planned != requested:
        log.info(
            "memory guard: %d parameters, %s available: loader batch sizes %s -> %s "
            "(set loader.train_batch_size / loader.test_batch_size to choose, memory_guard=false to keep)",
            num_params,
            size(available or 0),
            requested,
            planned,
        )
        loader.update(planned)
    options: Dict[str, Any] = {"kfac_layers": layers}
    if "max_iter" in attributor_cfg:
        options["max_iter"] = attributor_cfg["max_iter"]
    projector = attributor_cfg.get("projector_kwargs") or {}
    proj_dim = projector.get("proj_dim", attributor_cfg.get("proj_dim"))
    if proj_dim is not None:
        options["proj_dim"] = proj_dim
    options["proj_type"] = projector.get("proj_type")
    options["num_layers"] = sum(
        1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    )
    checkpoints = resolved.get("checkpoint")
    if checkpoints:
        num_checkpoints = len(checkpoints) if isinstance(checkpoints, (list, tuple)) else 1
    else:
        num_checkpoints = int((resolved.get("train") or {}).get("num_models", 1))
    feature_cache = bool(resolved.get("feature_cache", False)) and bool(
        getattr(cls, "uses_feature_store", False)
    )
    sizes = Sizes(
        num_params,
        int(loader["train_batch_size"]),
        int(loader["test_batch_size"]),
        int(split.train_indices.numel()),
        int(split.test_indices.numel()),
        itemsize,
        num_checkpoints,
    )
    est = estimate(method, sizes, options, available, feature_cache)
    what = f"{method} on {num_params:,} parameters"
    if available is not None:
        msg = refusal(est, available, what)
        if msg:
            raise ConfigError(msg)
    if est.disk:
        where = Path(str(resolved.get("cache_dir", "."))).expanduser() / "features"
        free = free_disk(where)
        msg = disk_refusal(est, free, str(where)) if free is not None else None
        if msg:
            raise ConfigError(msg)
