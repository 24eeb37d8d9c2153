"""TRAK: attribution through a random-projected, linearised model (Park et al., 2023).

For each checkpoint ``k`` (an ensemble of independently trained models):

* ``Phi_k`` (``n_train x d``): training loss gradients divided by ``sqrt(P)`` (the
  number of trainable parameters, for float32 range) and randomly projected
  with a matrix specific to ``k``;
* ``Psi_k`` (``n_test x d``): the same for the test target gradients;
* ``Q_k`` (``n_train``): ``1 - p`` with ``p`` the correct-class probability.

As in the public dattri 0.3.0, the kernel products and the ``Q`` weights are
averaged over checkpoints separately and multiplied at the end::

    scores = mean_k(Phi_k (Phi_k^T Phi_k)^-1 Psi_k^T) * mean_k(Q_k)[:, None]

with shape ``(n_train, n_test)``. ``regularization`` (dattri 0.3.0's ridge) is added
to the kernel's diagonal; it is then factored once per checkpoint by Cholesky
(float64, plus a tiny relative ridge); ``cache`` keeps ``Phi_k``, the factors and
``mean Q`` so that ``attribute`` only computes test gradients.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor, TrainRows, remembered
from dattri_cli.algorithm.grad_backend import (
    DEFAULT_BUFFER_BYTES,
    ChoosesGradBackend,
    LayerGradients,
    check_backend,
    resolve_dtype,
)
from dattri_cli.algorithm.utils import batch_size_of, check_finite, check_not_shuffled, num_samples, to_device
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.feature_cache import BlockStore, block_name
from dattri_cli.func.batch import SAMPLE_IN_DIMS
from dattri_cli.func.kernel import (  # noqa: F401 - re-exported: their home before func/kernel.py
    DEFAULT_REGULARIZATION_HINT,
    PSEUDO_INVERSE_RTOL,
    RELATIVE_RIDGE,
    SINGULAR_PIVOTS,
    KernelSolver,
    factor_kernel,
)
from dattri_cli.func.kronecker import KroneckerProjector
from dattri_cli.func.projection import RandomProjector, resolve_projector_kwargs, result_projector_kwargs
from dattri_cli.func.utils import per_sample_value
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask

#: Smallest Cholesky pivot, relative to the mean kernel diagonal, below which ``cache``
#: warns: the projected gradients barely span some direction, and the scores are then
#: dominated by it (measurements on digits: docs/benchmarks.md, "TRAK kernel conditioning").
ILL_CONDITIONED_PIVOT = 1e-4
#: Bytes of layer captures (inputs and output gradients) buffered before a dense per-layer
#: projection: each chunk of the random matrix is drawn once per such group of batches.
LAYER_BUFFER_BYTES = DEFAULT_BUFFER_BYTES


@dataclass
class TrainSide:
    """What the scores need from the training set, per checkpoint, plus the mean ``1 - p``.

    ``features[k]`` holds ``Phi_k`` as row blocks (one per training batch, float32)
    in a :class:`~dattri_cli.feature_cache.BlockStore`: in memory by default, on
    disk when the attributor was given a ``feature_store`` factory, so that memory
    does not grow with the number of training samples.
    """

    features: List["FeatureBlocks"]
    factors: List[KernelSolver]  # (Phi_k^T Phi_k + regularization I)^-1, one per checkpoint
    q: Tensor  # mean over checkpoints of 1 - p, (cached rows,) float64
    row_offset: int = 0  # absolute train row of the first cached row


@dataclass
class FeatureBlocks:
    """``Phi_k`` as row blocks ``[(start, stop), ...]`` (absolute rows) in a store."""

    store: BlockStore
    ranges: List[Tuple[int, int]]
    dim: int

    def blocks(self, start: int, stop: int) -> Iterator[Tuple[int, int, Tensor]]:
        """``(start, stop, block)`` for the blocks inside rows ``[start, stop)``."""
        for lo, hi in self.ranges:
            if lo >= start and hi <= stop:
                block = self.store.get(block_name(lo, hi))
                if block is None:
                    msg = f"TRAK feature block {lo}-{hi} vanished from {self.store.directory}"
                    raise ConfigError(msg)
                yield lo, hi, block

    def dense(self) -> Tensor:
        """All cached rows as one tensor (for small problems and tests)."""
        return torch.cat([b for _, _, b in self.blocks(self.ranges[0][0], self.ranges[-1][1])])

    @property
    def shape(self) -> Tuple[int, int]:
        """``(rows, dim)`` as if it were a tensor."""
        return (self.ranges[-1][1] - self.ranges[0][0], self.dim)


class TRAKAttributor(ChoosesGradBackend, Attributor):
    """TRAK over the task's checkpoints (one per independently trained model).

    The training rows are given to :meth:`prepare` (``cache``), which keeps their features;
    :meth:`score_rows` then scores any block of those rows from the kept features.
    """

    splits_over_ranks = True  # the kernel sum and row count are all-reduced
    keeps_test_side = True
    accumulator_dtype = torch.float64
    has_diagnostics = True
    uses_feature_store = True
    has_self_scores = True

    def __init__(
        self,
        task: AttributionTask,
        correct_probability_func: Optional[Callable],
        projector_kwargs: Optional[Dict[str, Any]] = None,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: str = "cpu",
        regularization: float = 0.0,
        grad_backend: str = "auto",
        dtype: str = "float32",
        allow_cpu_half: bool = False,
    ) -> None:
        """Set up the projector; no gradients are computed here.

        Args:
            task: the model, its checkpoints and the loss (train) / target (test),
                called on one sample without a batch dimension, as in dattri.
            correct_probability_func: ``f(params_dict, sample) -> p``, the probability
                of the correct label of one sample (no batch dimension), vmapped over
                the batch as in dattri; None weights every sample 1 (tasks without a
                correct label: regression, language models).
            projector_kwargs: updates to the dattri defaults ``proj_dim=512``,
                ``proj_max_batch_size=128`` (dattri: 32), ``proj_seed=0``, ``proj_type="normal"``
                (``"identity"`` disables the projection).
            layer_name: restrict gradients to these parameters (all if None).
            device: where gradients and kernels are computed.
            regularization: ridge added to the kernel ``Phi^T Phi`` before it is
                inverted (as dattri 0.3.0 adds it); makes the kernel invertible for
                any ``proj_dim`` and data size.
            grad_backend: ``"func"`` (``torch.func``, the ``(batch, P)`` gradient matrix),
                ``"layers"`` (per-layer captures projected layer by layer: each layer meets
                its own rows of the same seeded matrix, or with ``proj_type="kronecker"``
                its own Kronecker factors) or ``"auto"`` (see
                :mod:`dattri_cli.algorithm.grad_backend`).
            dtype: float32, or bfloat16 / float16 gradients and projections on a GPU
                (features and kernels stay float32 / float64; on a CPU only with
                ``allow_cpu_half``).
        """
        if not (
            isinstance(regularization, (int, float)) and math.isfinite(regularization) and regularization >= 0
        ):
            msg = f"regularization must be a finite number >= 0, got {regularization!r}"
            raise ConfigError(msg)
        self.regularization = float(regularization)
        self.task = task
        self.correct_probability_func = correct_probability_func
        self.projector_kwargs = resolve_projector_kwargs(projector_kwargs)
        self.projector: Any
        if self.projector_kwargs["proj_type"] == "kronecker":
            self.projector = KroneckerProjector(
                self.projector_kwargs["proj_dim"],
                seed=self.projector_kwargs["proj_seed"],
                deterministic=False,
            )
        else:
            self.projector = RandomProjector(**self.projector_kwargs)
        self.layer_name = layer_name
        self.device = device or "cpu"
        self.grad_backend = check_backend(grad_backend)
        self.dtype = resolve_dtype(dtype, self.device, allow_cpu_half)
        if self.dtype != torch.float32 and isinstance(self.projector, RandomProjector):
            self.projector.dtype = self.dtype
        self._layers: Optional[LayerGradients] = None
        self._backend_chosen = False
        #: captures held before a dense per-layer projection of the group (the layers backend)
        self.layer_buffer_bytes = LAYER_BUFFER_BYTES
        num_params = sum(p.numel() for p in task.get_model().parameters() if p.requires_grad)
        self.norm_scaler = math.sqrt(num_params)
        self.full_train_dataloader: Optional[DataLoader] = None
        self.train_side: Optional[TrainSide] = None
        self._init_hooks()  # feature_store None: features kept in memory

    # -- per-checkpoint pieces ---------------------------------------------------------
    def _grad_setup(self, ckpt_idx: int, target: bool) -> Tuple[Tensor, Callable]:
        params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        params = params.to(self.device)
        # dattri's convention: the functions see one sample without a batch dimension
        getter = self.task.get_grad_target_func if target else self.task.get_grad_loss_func
        return params, getter(in_dims=SAMPLE_IN_DIMS, layer_name=self.layer_name, ckpt_idx=ckpt_idx)

    def _grads(self, params: Tensor, grad_func: Callable, batch: Any) -> Tensor:
        """Per-sample gradients of ``batch``, divided by ``sqrt(P)``."""
        return grad_func(params, to_device(batch, self.device)).detach() / self.norm_scaler

    @staticmethod
    def _checked(projected: Tensor, side: str) -> Tensor:
        """``projected`` as float32, refused if not finite."""
        projected = projected.to(torch.float32)
        # checked after projection: a NaN/Inf gradient entry reaches every projected
        # coordinate (the random matrix has no zeros), and the projection is far smaller
        check_finite(projected, f"{side} gradients", hint="check the data and the checkpoint")
        return projected

    def _layer_stream(
        self, ckpt_idx: int, entries: Iterable[Tuple[Any, Optional[Any]]], target: bool
    ) -> Iterator[Tuple[Any, Optional[Tensor]]]:
        """``(key, features / sqrt(P))`` for ``(key, batch)`` entries in order (``None`` batches pass as None).

        A dense projection holds several batches' captures (up to ``layer_buffer_bytes``) and
        projects them together (:meth:`LayerGradients.feature_stream`, shared with TracIn), so
        each chunk of the random matrix is drawn once per group of batches, not once per batch.
        """
        assert self._layers is not None
        return self._layers.feature_stream(
            self.projector,
            ckpt_idx,
            ((key, batch, target) for key, batch in entries),
            buffer_bytes=self.layer_buffer_bytes,
            scale=self.norm_scaler,
        )

    def feature_dim(self) -> int:
        """Width of the projected features, known before any gradient is computed."""
        if self._layers is not None:
            return self._layers.feature_dim(self.projector)
        if self.projector.proj_type == "identity":
            return int(self.task.get_param(0, layer_name=self.layer_name)[0].numel())
        return self.projector.proj_dim

    def _features(self, ckpt_idx: int, loader: DataLoader, target: bool) -> Tensor:
        """Projected, scaled per-sample gradients of the loss (train) or target (test).

        The loader's batches form one projection stream: only its last block is padded.
        """
        side = "test" if target else "train"
        batches = track(loader, f"TRAK {side} gradients (checkpoint {ckpt_idx})")
        if self._layers is not None:
            stream = self._layer_stream(ckpt_idx, ((None, b) for b in batches), target)
            return torch.cat([self._checked(rows, side) for _, rows in stream])
        params, grad_func = self._grad_setup(ckpt_idx, target)
        items = ((None, self._grads(params, grad_func, batch)) for batch in batches)
        return torch.cat(
            [self._checked(rows, side) for _, rows in self.projector.project_stream(items, ckpt_idx)]
        )

    def _store(self, ckpt_idx: int) -> BlockStore:
        if self.feature_store is None:
            return BlockStore()
        extra = {
            "projector_kwargs": result_projector_kwargs(self.projector_kwargs),
            "ckpt_idx": ckpt_idx,
            "norm_scaler": self.norm_scaler,
        }
        extra.update(self._layout_key(("grad_backend", "layers")))
        return self.feature_store("trak_features", ckpt_idx, extra)

    def _train_items(
        self, ckpt_idx: int, loader: DataLoader, store: BlockStore
    ) -> Iterator[Tuple[Tuple[Any, int, Optional[Tensor]], Tensor]]:
        """``((batch, first row, stored block or None), gradients)`` per training batch.

        A batch whose block is stored brings no gradient rows: it only keeps its
        place in the projection stream, so blocks still come out in batch order.
        """
        row = self.train_row_offset
        if self._layers is not None:  # projected by the layers, several batches at a time

            def entries() -> Iterator[Tuple[Tuple[Any, int, Optional[Tensor]], Optional[Any]]]:
                row = self.train_row_offset
                for batch in track(loader, f"TRAK train gradients (checkpoint {ckpt_idx})"):
                    n = batch_size_of(batch)
                    stored = store.lookup(block_name(row, row + n))
                    yield (batch, row, stored), (batch if stored is None else None)
                    row += n

            yield from self._layer_stream(ckpt_idx, entries(), target=False)
            return
        params, grad_func = self._grad_setup(ckpt_idx, target=False)
        for batch in track(loader, f"TRAK train gradients (checkpoint {ckpt_idx})"):
            n = batch_size_of(batch)
            stored = store.lookup(block_name(row, row + n))
            grads = self._grads(params, grad_func, batch) if stored is None else torch.empty(0, 0)
            yield (batch, row, stored), grads
            row += n

    def _train_features(self, ckpt_idx: int, loader: DataLoader) -> Tuple[FeatureBlocks, Tensor, int, Tensor]:
        """Stream the training set once: feature blocks (stored, resumable), the kernel sum and ``1 - p``.

        Computed batches share one projection stream (no padding per batch); stored
        and computed blocks alike come out in batch order, so the kernel is summed in
        the same order (same bytes) whether the run is fresh, resumed or cached.
        """
        full_params = {k: v.to(self.device) for k, v in self.task.named_parameters(ckpt_idx).items()}
        store = self._store(ckpt_idx)
        ranges: List[Tuple[int, int]] = []
        # per-batch kernel parts folded in global batch order: the same bits under torchrun
        kernel, q_parts = distributed.OrderedSum(), []
        items = self._train_items(ckpt_idx, loader, store)
        stream = items if self._layers is not None else self.projector.project_stream(items, ckpt_idx)
        for (batch, row, stored), projected in stream:
            n = batch_size_of(batch)
            if stored is None:
                stored = self._checked(projected, "train")
                store.put(block_name(row, row + n), stored)
            wide = stored.to(self.device, torch.float64)
            kernel.add(wide.T @ wide)
            q_parts.append(self._one_minus_p(full_params, batch))
            ranges.append((row, row + n))
        if not ranges:
            msg = "the training loader is empty"
            raise NumericalError(msg)
        q = torch.cat(q_parts)
        check_finite(q, "correct-class probabilities", hint="check correct_probability_func")
        count = distributed.reduce_count(ranges[-1][1] - self.train_row_offset, self.device)
        total = kernel.result()
        return FeatureBlocks(store, ranges, total.shape[0]), total, count, q

    def _one_minus_p(self, params: Dict[str, Tensor], batch: Any) -> Tensor:
        """``1 - p`` per sample of ``batch``, from the full parameters of the checkpoint (1 without a function)."""
        if (
            self.correct_probability_func is None
        ):  # tasks without a correct label (regression, language models)
            return torch.ones(batch_size_of(batch), dtype=torch.float64, device=self.device)
        probs = per_sample_value(
            self.correct_probability_func, params, to_device(batch, self.device), batch_of_one=False
        ).detach()
        return 1.0 - probs.to(torch.float64).flatten()

    def _train_side(self, loader: DataLoader) -> TrainSide:
        """Features, kernel factors and mean ``1 - p`` over all checkpoints."""
        features, factors, q_sum = [], [], None
        for ckpt_idx in range(len(self.task.get_checkpoints())):
            phi, kernel, count, q = self._train_features(ckpt_idx, loader)
            features.append(phi)
            # layers backend, one process: a singular kernel's pseudo-inverse from the n x n Gram matrix
            rows = phi.dense if self._layers is not None and distributed.world()[1] == 1 else None
            factors.append(factor_kernel(kernel, count, self.regularization, rows=rows))
            q_sum = q if q_sum is None else q_sum + q
        return TrainSide(features, factors, q_sum / len(features), self.train_row_offset)

    # -- the runner's contract ----------------------------------------------------------------
    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:
        """Compute and keep the train side of rows ``row_offset ...``, so scoring only touches test data."""
        self.train_row_offset = row_offset
        self._cache(train_dataloader)

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores of the prepared rows ``[rows.start, rows.stop)`` (on training-batch boundaries)."""
        return self._attribute(self._resolve_train_side(None), test_dataloader, rows.start, rows.stop)

    def self_scores(self, train_dataloader: DataLoader) -> Tensor:
        """Self-influence of every training sample (see :meth:`self_attribute`)."""
        return self.self_attribute(train_dataloader)

    # -- the dattri-style API -------------------------------------------------------------------
    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Compute and keep the train side so that ``attribute`` only touches test data."""
        self.prepare(full_train_dataloader, self.train_row_offset)

    def _cache(self, full_train_dataloader: DataLoader) -> None:
        check_not_shuffled(full_train_dataloader, "full_train_dataloader")
        self._choose_backend(full_train_dataloader)
        self._check_dims(full_train_dataloader)
        self.train_side = self._train_side(full_train_dataloader)
        self.full_train_dataloader = full_train_dataloader
        # Smallest Cholesky pivot over the mean kernel diagonal: a cheap conditioning indicator.
        self.diagnostics = {
            "kernel_min_pivot_relative": [f.min_pivot_relative for f in self.train_side.factors],
            "proj_dim": self.train_side.features[0].dim,
        }
        worst = min(self.diagnostics["kernel_min_pivot_relative"])
        if worst < ILL_CONDITIONED_PIVOT and all(f.factor is not None for f in self.train_side.factors):
            warnings.warn(
                f"the TRAK kernel Phi^T Phi is ill-conditioned (smallest pivot {worst:.1e} of the mean): the "
                f"training gradients barely vary in some of the {self.diagnostics['proj_dim']} projected "
                "directions and will dominate the scores; a ridge (e.g. "
                f'regularization={DEFAULT_REGULARIZATION_HINT}) or a smaller projector_kwargs["proj_dim"] '
                "usually attributes better (check with `dattri eval`)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _check_dims(self, loader: DataLoader) -> None:
        """Before any gradient: warn when the features are wider than the training rows without a ridge.

        The kernel ``Phi^T Phi`` is then singular whatever the gradients (only its
        pseudo-inverse exists); the same advice as the warning after the solve, but
        before minutes of gradients.
        """
        if self.regularization > 0:
            return
        dim = self.feature_dim()
        rows = distributed.reduce_count(num_samples(loader), self.device)
        if dim > rows:
            warnings.warn(
                f"TRAK: {dim} projected dimensions for {rows} training samples and regularization=0: the "
                f"kernel Phi^T Phi will be singular; add a ridge (e.g. regularization={DEFAULT_REGULARIZATION_HINT}) "
                f'or lower projector_kwargs["proj_dim"] to at most {rows}',
                RuntimeWarning,
                stacklevel=3,
            )

    def _resolve_train_side(self, train_dataloader: Optional[DataLoader]) -> TrainSide:
        """The cached train side, or one computed from ``train_dataloader`` (not both, not neither).

        Passing the very loader given to ``cache`` again counts as passing none.
        """
        if train_dataloader is not None and train_dataloader is self.full_train_dataloader:
            train_dataloader = None
        if train_dataloader is not None and self.train_side is not None:
            msg = (
                "a training loader was cached with cache() and another was passed to attribute(); "
                "pass none to attribute() and select rows of the scores for a subset"
            )
            raise ConfigError(msg)
        if train_dataloader is None and self.train_side is None:
            msg = "no training data: call cache(full_train_dataloader) first or pass train_dataloader to attribute()"
            raise ConfigError(msg)
        if train_dataloader is None:
            return self.train_side  # type: ignore[return-value]
        check_not_shuffled(train_dataloader, "train_dataloader")
        self._choose_backend(train_dataloader)
        self._check_dims(train_dataloader)
        return self._train_side(train_dataloader)

    def attribute(
        self,
        test_dataloader: DataLoader,
        train_dataloader: Optional[DataLoader] = None,
    ) -> Tensor:
        """Scores ``(num_train, num_test)``; ``train_dataloader`` only when nothing is cached."""
        side = self._resolve_train_side(train_dataloader)
        start = side.row_offset
        return self._attribute(side, test_dataloader, start, start + side.q.shape[0])

    def attribute_rows(self, test_dataloader: DataLoader, start: int, stop: int) -> Tensor:
        """Scores of the cached training rows ``[start, stop)`` (absolute, on block boundaries)."""
        return self._attribute(self._resolve_train_side(None), test_dataloader, start, stop)

    def _solved_test_side(self, ckpt_idx: int, factor: KernelSolver, test_dataloader: DataLoader) -> Tensor:
        """``(Phi_k^T Phi_k)^-1 Psi_k^T`` (``d x n_test``, float64), memoised if asked."""

        def compute() -> Tensor:
            psi = self._features(ckpt_idx, test_dataloader, target=True).to(torch.float64)
            return factor.solve(psi.T)

        return remembered(self.test_side_memo, ckpt_idx, test_dataloader, compute)

    def _attribute(self, side: TrainSide, test_dataloader: DataLoader, start: int, stop: int) -> Tensor:
        check_not_shuffled(test_dataloader, "test_dataloader")
        scores = None
        for ckpt_idx, (phi, factor) in enumerate(zip(side.features, side.factors)):
            solved = self._solved_test_side(ckpt_idx, factor, test_dataloader)
            if scores is None:
                scores = torch.zeros(stop - start, solved.shape[1], dtype=torch.float64, device=solved.device)
            covered = 0
            for lo, hi, block in phi.blocks(start, stop):
                scores[lo - start : hi - start] += block.to(solved.device, torch.float64) @ solved
                covered += hi - lo
            if covered != stop - start:
                msg = f"rows {start}-{stop} do not fall on the cached TRAK feature blocks; align them to train batches"
                raise ConfigError(msg)
        q = side.q[start - side.row_offset : stop - side.row_offset]
        scores = scores / len(side.features) * q[:, None]
        check_finite(scores, "TRAK scores", hint='lower projector_kwargs["proj_dim"]')
        return scores.to(torch.float32)

    def self_attribute(self, train_dataloader: Optional[DataLoader] = None) -> Tensor:
        """Self-influence ``score(i, i)`` of each training sample, shape ``(num_train,)``.

        Uses the cached train side or ``train_dataloader`` (same rules as ``attribute``);
        no test gradients are needed since the train features are the test features
        when the loss is also the target.
        """
        side = self._resolve_train_side(train_dataloader)
        total = None
        for blocks, factor in zip(side.features, side.factors):
            phi = blocks.dense().to(torch.float64)
            leverage = (phi * factor.solve(phi.T).T).sum(dim=1)
            total = leverage if total is None else total + leverage
        out = total / len(side.features) * side.q
        check_finite(out, "TRAK self-influence", hint='lower projector_kwargs["proj_dim"]')
        return out.to(torch.float32)


__all__: Tuple[str, ...] = ("FeatureBlocks", "KernelSolver", "TRAKAttributor", "TrainSide", "factor_kernel")
