"""The memory guard: estimate a run's peak memory (and feature-cache disk) before heavy work.

Why: at millions of parameters the cost of an attribution run is set by a few
parameter-sized objects, and a run that cannot fit should say so at once, with the
number and the override that fixes it, instead of swapping for minutes and being
killed. The estimates are deliberately simple products of the sizes that dominate, their
multiples checked against measured peaks by ``scripts/bench_memory_guard.py``
(docs/benchmarks.md, "Memory guard against measured peaks"):

* a fixed :data:`RUNTIME_OVERHEAD_BYTES` every run adds after the guard;
* one batch's activations, ``batch x A x itemsize x`` :data:`BATCH_ACTIVATION_COPIES`,
  ``A`` the elements the model's leaf modules output for one sample (:func:`probe_model`
  runs the model on one training sample to count them);
* per-sample gradients: ``batch x P x itemsize`` for the vmapped gradients, times
  :data:`GRAD_WORK_FACTOR` for the per-sample intermediates ``vmap`` keeps;
* the test side an inner-product attributor keeps across row blocks: ``n_test x P``
  gradients and their transform (:data:`TEST_SIDE_COPIES` copies);
* the explicit Hessian: ``P^2`` in the parameter dtype per batch, plus the float64
  sum, its symmetrised copy and the Cholesky / LU factor (``P^2 x (itemsize + 24)``),
  and ``jacrev(jacrev)``'s graph: one vector-Jacobian product per parameter through a
  batch, ``P x batch x A x itemsize x`` :data:`VJP_ACTIVATION_COPIES`;
* CG / LiSSA: their row chunks, ``min(n_test, rows per chunk) x P x`` the solver's
  working vectors (:mod:`dattri_cli.func.ihvp` chunks them under a fixed budget), and
  the chunk's vmapped HVPs through a batch, ``rows x batch x A x itemsize x 3``;
* TRAK: the kernel, the dense projector's kept matrix (``P x proj_dim``, up to
  ``max_matrix_mb``) and its row block (two copies of ``128 x P``, at most 256 MiB each);
* Arnoldi: its float64 Krylov basis, ``(max_iter + 1) x P x 8``;
* EK-FAC / K-FAC: per layer the float64 factors, their eigenvectors and the
  corrected eigenvalues, ``(in^2 + out^2) x 8 x 2 + in x out x 8 x 2``; a batch's layer
  captures (``batch x positions x (in + out)``, a convolution's unfolded input), EK-FAC's
  float64 eigenvalue correction (rotated inputs, and the widest layer's per-sample
  gradients in the eigenbasis with their squares: ``batch x 2 x in x out x 8``); and the
  Gauss-Newton output Hessians, ``4 x batch x C^2`` for ``C`` outputs per sample (exact),
  or ``4 x batch x T x V^2`` for ``T`` positions of ``V`` values with ``num_output_samples``;
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
#: what every run adds after the guard whatever its size (measured 87-124 MiB on the digits logistic
#: regression, scripts/bench_memory_guard.py): modules imported later, autograd and vmap workspaces,
#: the allocator's per-thread arenas
RUNTIME_OVERHEAD_BYTES = 128 * 2**20
#: copies of one batch's activations a forward and backward pass keeps (outputs, their gradients, saved inputs)
BATCH_ACTIVATION_COPIES = 4
#: copies of a batch's activations each vmapped vector-Jacobian product through the backward graph holds
#: (explicit Hessian: one per parameter; CG / LiSSA: one per right-hand side of a chunk)
VJP_ACTIVATION_COPIES = 3
#: ``(B, C, C)`` copies the exact Gauss-Newton factors hold: the stacked output Hessian, its
#: symmetrised copy, the eigenvectors and the roots (func/kfac.py ``_output_hessian``, ``_psd_roots``)
OUTPUT_HESSIAN_COPIES = 4
#: copies of EK-FAC's per-layer captures of a batch (inputs ``(B, L, in[+1])``, one pass's output
#: gradients ``(B, L, out)``, their per-sample products and rotations) held while the factors are
#: summed: 6 covers the digits CNN's measured peak (3 left it 15% under, scripts/bench_memory_guard.py)
KFAC_CAPTURE_COPIES = 6


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


def projection_matrix_bytes(num_params: int, proj_dim: int, max_matrix_bytes: int, itemsize: int = 4) -> int:
    """The dense projector's random matrix: kept up to ``max_matrix_bytes``, else one chunk at a time."""
    from dattri_cli.func import projection  # noqa: PLC0415 - only TRAK runs need it

    whole = int(num_params) * int(proj_dim) * int(itemsize)
    chunk = projection.CHUNK_ELEMENTS * int(itemsize)
    return whole if whole <= max_matrix_bytes else int(max_matrix_bytes) + chunk


def projection_block_bytes(num_params: int, block_rows: int, itemsize: int = 4) -> int:
    """The dense projector's row queue and the zero-padded block it multiplies: two copies of
    ``rows x P`` with ``rows = min(proj_max_batch_size, MAX_BLOCK_BYTES / (P x itemsize))``."""
    from dattri_cli.func import projection  # noqa: PLC0415 - only TRAK runs need it

    row = max(1, int(num_params) * int(itemsize))
    rows = max(1, min(int(block_rows), projection.MAX_BLOCK_BYTES // row))
    return 2 * rows * row


def batch_activation_bytes(batch_size: int, activations: int, itemsize: int = 4) -> int:
    """One batch's forward and backward pass: :data:`BATCH_ACTIVATION_COPIES` copies of its activations."""
    return int(batch_size) * int(activations) * int(itemsize) * BATCH_ACTIVATION_COPIES


def vjp_graph_bytes(vectors: int, batch_size: int, activations: int, itemsize: int = 4) -> int:
    """``vectors`` vmapped vector-Jacobian products through one batch's backward graph (Hessian rows, HVPs)."""
    return int(vectors) * int(batch_size) * int(activations) * int(itemsize) * VJP_ACTIVATION_COPIES


def output_hessian_bytes(
    batch_size: int,
    outputs: int,
    positions: int = 1,
    num_output_samples: Optional[int] = None,
    itemsize: int = 4,
) -> int:
    """EK-FAC / K-FAC's Gauss-Newton output Hessians of one batch (``func/kfac.py``).

    Exact (``num_output_samples`` None): ``B`` matrices ``C x C`` (``C`` outputs per
    sample), stacked, symmetrised, decomposed and rooted: :data:`OUTPUT_HESSIAN_COPIES`
    copies of ``B x C^2``. Sampled (``k`` pseudo-gradients, streamed one at a time): an
    output that adds up per position (``positions`` ``T`` > 1, ``V = C / T`` values each:
    a language model) holds ``B x T`` blocks ``V x V`` instead; otherwise the ``C x C``
    matrices are formed as in the exact case.
    """
    b, c, t = int(batch_size), int(outputs), max(1, int(positions))
    if num_output_samples is not None and t > 1:
        v = c // t
        return OUTPUT_HESSIAN_COPIES * b * t * v * v * int(itemsize)
    return OUTPUT_HESSIAN_COPIES * b * c * c * int(itemsize)


def kfac_capture_bytes(batch_size: int, layers: Iterable[Tuple[int, int, int]], itemsize: int = 4) -> int:
    """EK-FAC's captures of one batch, layers given as ``(in[+1], out, positions)`` (a convolution's
    unfolded input is ``positions x in * kh * kw`` per sample)."""
    per_sample = sum(int(pos) * (int(i) + int(o)) for i, o, pos in layers)
    return int(batch_size) * per_sample * int(itemsize) * KFAC_CAPTURE_COPIES


def eigen_correction_bytes(batch_size: int, layers: Iterable[Tuple[int, int, int]]) -> int:
    """EK-FAC's eigenvalue correction of one batch (``func/kfac.py``), in float64: every layer's rotated
    inputs ``(B, L, in[+1])``, and the per-sample gradients in the eigenbasis ``(B, out, in[+1])`` of
    the widest layer with their squares (formed layer by layer)."""
    layers = list(layers)
    if not layers:
        return 0
    rotated = sum(int(pos) * int(i) for i, _, pos in layers)
    widest = max(int(i) * int(o) for i, o, _ in layers)
    return int(batch_size) * (rotated + 2 * widest) * FLOAT64


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
    #: elements the model's leaf modules output for one sample (0: unknown, activation terms left out)
    activations: int = 0
    #: model outputs per sample, and how many positions they span (a language model: T of T x V)
    outputs: int = 0
    positions: int = 1


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
    est.memory["runtime"] = RUNTIME_OVERHEAD_BYTES
    est.fixes["runtime"] = "more free memory (this is the fixed share every run takes)"
    if sizes.activations:
        batch = max(sizes.train_batch_size, sizes.test_batch_size)
        est.memory["batch_activations"] = batch_activation_bytes(batch, sizes.activations, item)
        est.fixes["batch_activations"] = "smaller loader.train_batch_size / loader.test_batch_size"
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
        if sizes.activations:  # jacrev(jacrev): one vector-Jacobian product per parameter, vmapped
            est.memory["hessian_graph"] = vjp_graph_bytes(p, sizes.train_batch_size, sizes.activations, item)
            est.fixes["hessian_graph"] = "a smaller loader.train_batch_size (the Hessian is summed per batch)"
        if feature_cache:
            est.disk["cached_hessian"] = p * p * FLOAT64
    elif method in ("IFAttributorCG", "IFAttributorLiSSA"):
        vectors = ihvp.CG_VECTORS_PER_ROW if method == "IFAttributorCG" else ihvp.LISSA_VECTORS_PER_ROW
        est.memory["solver_chunk"] = solver_chunk_bytes(
            sizes.n_test, p, item, vectors, ihvp.CHUNK_BUDGET_BYTES
        )
        est.fixes["solver_chunk"] = "attributor=if_ekfac (no parameter-sized solver vectors)"
        if sizes.activations:  # the chunk's HVPs are vmapped through each batch's backward graph
            rows = est.memory["solver_chunk"] // max(1, p * item * vectors)
            est.memory["hvp_graph"] = vjp_graph_bytes(rows, sizes.train_batch_size, sizes.activations, item)
            est.fixes["hvp_graph"] = "a smaller loader.train_batch_size (each HVP runs through one batch)"
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
        if options.get("proj_type") != "kronecker":
            from dattri_cli.func import projection  # noqa: PLC0415 - only TRAK runs need it

            mb = options.get("max_matrix_mb")
            limit = int(mb * 2**20) if mb is not None else projection.DEFAULT_MAX_MATRIX_BYTES
            est.memory["projection_matrix"] = projection_matrix_bytes(
                p, int(options.get("proj_dim", 512)), limit, item
            )
            est.fixes["projection_matrix"] = (
                "attributor.projector_kwargs.max_matrix_mb (kept chunks of the matrix)"
            )
            est.memory["projection_block"] = projection_block_bytes(
                p,
                int(
                    options.get("proj_max_batch_size")
                    or projection.DEFAULT_PROJECTOR_KWARGS["proj_max_batch_size"]
                ),
                item,
            )
            est.fixes["projection_block"] = "a smaller attributor.projector_kwargs.proj_max_batch_size"
    elif method in ("IFAttributorEKFAC", "IFAttributorKFAC"):
        est.memory["kfac_factors"] = kfac_factor_bytes(options.get("kfac_layers", ()))
        est.fixes["kfac_factors"] = "fewer layers (attributor.module_name)"
        positions = options.get("kfac_positions")
        if positions:
            layers = [(i, o, pos) for (i, o), pos in zip(options.get("kfac_layers", ()), positions)]
            est.memory["layer_captures"] = kfac_capture_bytes(sizes.train_batch_size, layers, item)
            if method == "IFAttributorEKFAC":
                est.memory["eigen_correction"] = eigen_correction_bytes(sizes.train_batch_size, layers)
                est.fixes["eigen_correction"] = "a smaller loader.train_batch_size"
            est.fixes["layer_captures"] = (
                "a smaller loader.train_batch_size, or fewer layers (attributor.module_name)"
            )
        if options.get("fisher", "gauss_newton") == "gauss_newton" and sizes.outputs:
            samples = options.get("num_output_samples")
            est.memory["output_hessian"] = output_hessian_bytes(
                sizes.train_batch_size, sizes.outputs, sizes.positions, samples, item
            )
            est.fixes["output_hessian"] = (
                "attributor.num_output_samples=4 (sampled pseudo-gradients), a smaller "
                "loader.train_batch_size, or attributor.fisher=empirical"
                if samples is None
                else "a smaller loader.train_batch_size, or attributor.fisher=empirical"
            )
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
            layers.append((cols, out, name))
        return {n: params[n] for n in selection.param_names if n in params}, tuple(layers)
    layer_name = cfg.get("layer_name")
    if isinstance(layer_name, str):
        layer_name = [layer_name]
    if isinstance(layer_name, (list, tuple)):
        return {n: params[n] for n in layer_name if n in params}, ()
    return params, ()


@dataclass(frozen=True)
class Probe:
    """What one sample's forward pass shows: leaf-module output elements, and the model output's shape."""

    activations: int = 0
    outputs: int = 0
    positions: int = 1
    #: elements each leaf module (by name) outputs for the sample
    module_outputs: Mapping[str, int] = field(default_factory=dict)


def probe_model(model: Any, split: Any) -> Probe:
    """Run the model on the first training sample (no gradients) and count what it produces.

    ``activations``: the elements every leaf module outputs (a proxy of what a batch's
    backward graph keeps per sample); ``outputs``/``positions``: the model output's size per
    sample and its positions (``T`` of an LM's ``(T, V)`` logits). A model the probe cannot
    run (a custom batch layout) gives an empty :class:`Probe`: the terms that need it are left out.
    """
    import torch  # noqa: PLC0415

    from dattri_cli import tasks  # noqa: PLC0415
    from dattri_cli.data import protocol  # noqa: PLC0415
    from dattri_cli.models.hf import unwrap_logits  # noqa: PLC0415

    counts: Dict[str, int] = {}

    def hook_for(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            items = output if isinstance(output, (tuple, list)) else (output,)
            counts[name] = counts.get(name, 0) + sum(t.numel() for t in items if isinstance(t, torch.Tensor))

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook_for(n)) for n, m in leaves]
    training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    # eval mode and a forked RNG: the probe changes no batch-norm statistics and draws no dropout
    # masks from the run's random stream (the model may be the one trained next)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            model.eval()
            batch = next(iter(protocol.row_loader(split, 0, 1, 1)))
            if isinstance(batch, dict):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            elif isinstance(batch, (tuple, list)):
                batch = tuple(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch)
            call = tasks.split_batch(batch, protocol.sample_ndim(split))
            out = unwrap_logits(tasks.ModelCaller(model)(dict(model.named_parameters()), call))
    except Exception as exc:  # noqa: BLE001 - a best-effort probe: a model it cannot run loses only these terms
        log.debug("memory guard: could not probe the model (%s); activation terms left out", exc)
        return Probe()
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return Probe(sum(counts.values()), 0, 1, counts)
    per_sample = out[0]
    positions = per_sample.numel() // per_sample.shape[-1] if per_sample.dim() >= 2 else 1
    return Probe(sum(counts.values()), per_sample.numel(), positions, counts)


def guard(
    resolved: Dict[str, Any], attributor_cfg: Mapping[str, Any], model: Any, split: Any
) -> Optional[Estimate]:
    """Before checkpoints are trained or loaded: lower default loader batch sizes that would not fit,
    then refuse a run whose estimated peak memory or feature cache does not fit.

    ``resolved["loader"]`` is updated in place (so the score file records the sizes
    used). Does nothing with ``memory_guard=false``. Returns the estimate of a run it lets
    through (None when off), so the run can record it next to its measured peak.
    """
    if not resolved.get("memory_guard", True):
        return None
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
    probe = probe_model(model, split)
    options: Dict[str, Any] = {"kfac_layers": [(i, o) for i, o, _ in layers]}
    if layers and probe.module_outputs:  # a layer's positions: its output per sample over its width
        options["kfac_positions"] = [max(1, probe.module_outputs.get(n, o) // o) for _, o, n in layers]
    for key in ("max_iter", "fisher", "num_output_samples"):
        if key in attributor_cfg:
            options[key] = attributor_cfg[key]
    projector = attributor_cfg.get("projector_kwargs") or {}
    proj_dim = projector.get("proj_dim", attributor_cfg.get("proj_dim"))
    if proj_dim is not None:
        options["proj_dim"] = proj_dim
    options["proj_type"] = projector.get("proj_type")
    options["max_matrix_mb"] = projector.get("max_matrix_mb")
    options["proj_max_batch_size"] = projector.get("proj_max_batch_size")
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
        probe.activations,
        probe.outputs,
        probe.positions,
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
    return est


def resident_bytes(status: Path = Path("/proc/self/status")) -> Optional[int]:
    """This process's resident memory now (``VmRSS``), None where unknown: the base the estimate adds to."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def record(timings: Dict[str, float], est: Optional[Estimate], base: Optional[int]) -> None:
    """The estimate (total and per component) and the resident memory before it, in MiB, into ``timings``."""
    if est is None:
        return
    timings["memory_estimate_mib"] = est.peak / 2**20
    for key, value in est.memory.items():
        timings[f"memory_estimate_{key}_mib"] = value / 2**20
    if base is not None:
        timings["rss_before_guard_mib"] = base / 2**20
