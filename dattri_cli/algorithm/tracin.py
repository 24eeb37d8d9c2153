"""TracIn, Grad-Dot and Grad-Cos: weighted sums of gradient inner products.

``score(i, j) = sum_k w_k <g_k(train_i), g_k(test_j)>`` over checkpoints ``k``
(cosine similarity instead of the inner product when ``normalized_grad``).
Grad-Dot / Grad-Cos are the one-checkpoint, unit-weight special cases.

Per-sample gradients come from ``torch.func`` (``grad_backend="func"``: the
``(batch, P)`` matrix) or layer by layer (``"layers"``, see
:mod:`dattri_cli.algorithm.grad_backend`): then inner products and norms are summed
over layers from each layer's inputs and output gradients, and projections are
applied per layer, so the ``(batch, P)`` matrix is never formed.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.functional import normalize
from torch.utils.data import DataLoader

from dattri_cli.algorithm.base import Attributor, TrainRows, remembered, sum_over_checkpoints
from dattri_cli.algorithm.grad_backend import (
    DEFAULT_BUFFER_BYTES,
    ChoosesGradBackend,
    LayerGradients,
    check_backend,
    resolve_dtype,
)
from dattri_cli.algorithm.utils import (
    check_finite,
    check_not_shuffled,
    num_samples,
    to_device,
)
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import DEFAULT_MAX_STORE_GB, BlockStore, block_name, store_fits
from dattri_cli.func.batch import SAMPLE_IN_DIMS, batch_size_of
from dattri_cli.func.kronecker import KroneckerProjector
from dattri_cli.func.layer_grads import LayerCapture, inner_products, sq_norms
from dattri_cli.func.projection import RandomProjector, make_projector, resolve_projector_kwargs
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask

log = logging.getLogger("dattri_cli")
#: smallest norm a gradient is divided by (as ``torch.nn.functional.normalize``)
NORM_EPS = 1e-12


class TracInAttributor(ChoosesGradBackend, Attributor):
    """TracIn over the task's checkpoints, weighted by ``weight_list``."""

    splits_over_ranks = True  # nothing sums over the training set
    keeps_test_side = True
    uses_feature_store = True
    has_self_scores = True

    def __init__(
        self,
        task: AttributionTask,
        weight_list: Union[Tensor, Sequence[float]],
        normalized_grad: bool,
        projector_kwargs: Optional[Dict[str, Any]] = None,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: str = "cpu",
        grad_backend: str = "auto",
        dtype: str = "float32",
        allow_cpu_half: bool = False,
        feature_cache_max_gb: float = DEFAULT_MAX_STORE_GB,
    ) -> None:
        """Weights are learning rates for TracIn, ones for Grad-Dot / Grad-Cos.

        ``projector_kwargs=None`` scores the full gradients (exact); a dictionary,
        even an empty one, projects them with the defaults of
        :data:`dattri_cli.func.projection.DEFAULT_PROJECTOR_KWARGS` updated by it
        (``proj_type="kronecker"``: a per-layer Kronecker projection with ``proj_dim``
        dimensions per layer, layers backend only).

        ``grad_backend``: ``"func"`` (``torch.func``), ``"layers"`` (per-layer captures,
        no ``(batch, P)`` matrix) or ``"auto"`` (layers for models of a million
        parameters or more when they are exactly equivalent; see
        :mod:`dattri_cli.algorithm.grad_backend`). ``dtype``: float32, or bfloat16 /
        float16 for the captured gradients and projections on a GPU (scores are
        accumulated in float32; on a CPU only with ``allow_cpu_half``).
        ``feature_cache_max_gb``: unprojected training gradients are kept in the
        feature cache only when they take at most this many GiB.
        """
        self.task = task
        self.weight_list = torch.as_tensor(weight_list, dtype=torch.float64).flatten()
        self.normalized_grad = normalized_grad
        self.projector_kwargs = dict(projector_kwargs) if projector_kwargs is not None else None
        self.projector: Any = None
        if self.projector_kwargs is not None:
            resolved = resolve_projector_kwargs(self.projector_kwargs)
            if resolved["proj_type"] == "kronecker":
                self.projector = KroneckerProjector(
                    resolved["proj_dim"], seed=resolved["proj_seed"], deterministic=False
                )
            else:
                self.projector = make_projector(self.projector_kwargs)
        self.layer_name = layer_name
        self.device = device or "cpu"
        self.grad_backend = check_backend(grad_backend)
        self.dtype = resolve_dtype(dtype, self.device, allow_cpu_half)
        if self.dtype != torch.float32 and isinstance(self.projector, RandomProjector):
            self.projector.dtype = self.dtype
        self.feature_cache_max_gb = float(feature_cache_max_gb)
        self._layers: Optional[LayerGradients] = None
        self._backend_chosen = False
        #: captures held before a dense per-layer projection of the group (the layers backend)
        self.layer_buffer_bytes = DEFAULT_BUFFER_BYTES
        self._store_rows = 0
        self._store_skip_logged = False
        self._init_hooks()

    # -- the runner's contract -----------------------------------------------------------------
    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:
        """Nothing to precompute: gradients are streamed in :meth:`score_rows`."""

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores of ``rows`` (their absolute rows name the stored gradient blocks)."""
        return self._scores(rows.loader, test_dataloader, rows.start)

    def self_scores(self, train_dataloader: DataLoader) -> Tensor:
        """Self-influence of every training sample (see :meth:`self_attribute`)."""
        return self._self_scores(train_dataloader)

    # -- the dattri-style API -------------------------------------------------------------------
    def cache(self) -> None:
        """Nothing to precompute: gradients are streamed in ``attribute``."""

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        """Scores ``(num_train, num_test)``: the weighted sum over checkpoints."""
        return self._scores(train_dataloader, test_dataloader, self.train_row_offset)

    def self_attribute(self, train_dataloader: DataLoader) -> Tensor:
        """Self-influence ``sum_k w_k <g_k(train_i), g_k(train_i)>``, shape ``(num_train,)``.

        The diagonal of train-x-train TracIn, one row-wise product per batch, so the
        full matrix is never formed. Both sides use the training loss gradient
        (the sample is its own test point). With ``normalized_grad`` every term
        is ``w_k``: cosine self-similarity carries no ranking signal.
        """
        return self._self_scores(train_dataloader)

    # -- computation ------------------------------------------------------------------------------

    def _project(self, ckpt_idx: int, grads: Tensor) -> Tensor:
        """Seeded random projection (one matrix per checkpoint), or the identity."""
        if self.projector is None:
            return grads
        return self.projector.project(grads, ckpt_idx=ckpt_idx)

    def _store(self, ckpt_idx: int) -> Optional[BlockStore]:
        """Projected (not normalised) train gradients: shared by Grad-Dot, Grad-Cos and TracIn.

        Unprojected gradients are kept only when all of them fit ``feature_cache_max_gb``
        (one log line otherwise); the layers backend without a projection forms none.
        """
        if self.feature_store is None:
            return None
        if self._layers is not None and self.projector is None:
            return None
        extra: Dict[str, Any] = {"projection": None, "calls": "sample"}
        if self.projector is None:
            num_params = int(self.task.get_param(ckpt_idx, layer_name=self.layer_name)[0].numel())
            nbytes = self._store_rows * num_params * torch.tensor([], dtype=torch.float32).element_size()
            if not store_fits(
                nbytes, self.feature_cache_max_gb, "feature_cache_max_gb", log_once=self._log_skip
            ):
                return None
        if self.projector is not None:  # the projection is seeded by the checkpoint index
            extra = {"projection": self.projector_kwargs, "ckpt_idx": ckpt_idx, "calls": "sample"}
        extra.update(self._layout_key(("calls", "layers")))
        return self.feature_store("train_grads", ckpt_idx, extra)

    def _log_skip(self) -> bool:
        """True the first time (the caller logs), False after."""
        first = not self._store_skip_logged
        self._store_skip_logged = True
        return first

    def _normalize(self, rep: Tensor) -> Tensor:
        return normalize(rep, dim=1) if self.normalized_grad else rep

    def _raw_rep(self, ckpt_idx: int, batch: Any, target: bool) -> Tensor:
        if self._layers is not None:
            return self._layer_rep(self._layers.captures(ckpt_idx, batch, target), ckpt_idx)
        params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        params = params.to(self.device)
        # dattri's convention: the functions see one sample without a batch dimension
        getter = self.task.get_grad_target_func if target else self.task.get_grad_loss_func
        grad_func = getter(in_dims=SAMPLE_IN_DIMS, layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        return self._project(ckpt_idx, grad_func(params, to_device(batch, self.device)).detach())

    def _layer_rep(self, caps: Dict[str, LayerCapture], ckpt_idx: int) -> Tensor:
        """Projected (or, for the identity projection, concatenated) per-sample gradients from captures."""
        assert self._layers is not None
        if isinstance(self.projector, KroneckerProjector):
            return self.projector.project(caps, ckpt_idx).float()
        if self.projector is None or self.projector.proj_type == "identity":
            return self._layers.flat(caps)
        return self._layers.project_dense(caps, self.projector, ckpt_idx)

    def _rep(self, ckpt_idx: int, batch: Any, target: bool) -> Tensor:
        return self._normalize(self._raw_rep(ckpt_idx, batch, target))

    def _test_matrix(self, ckpt_idx: int, test_dataloader: DataLoader) -> Tensor:
        """(Projected, normalised) test gradients of one checkpoint, memoised if asked."""

        def compute() -> Tensor:
            reps = [self._rep(ckpt_idx, b, target=True) for b in track(test_dataloader, "test gradients")]
            test_rep = torch.cat(reps)
            check_finite(test_rep, "test gradients", hint="check the test data and the checkpoint")
            return test_rep

        return remembered(self.test_side_memo, ckpt_idx, test_dataloader, compute)

    def _scores(self, train_dataloader: DataLoader, test_dataloader: DataLoader, row_offset: int) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        check_not_shuffled(test_dataloader, "test_dataloader")
        num_ckpts = len(self.task.get_checkpoints())
        if num_ckpts != len(self.weight_list):
            msg = (
                f"weight_list has {len(self.weight_list)} entries but the task has "
                f"{num_ckpts} checkpoints; give one weight per checkpoint"
            )
            raise ConfigError(msg)
        layers = self._choose_backend(train_dataloader)
        self._store_rows = num_samples(train_dataloader)
        if layers is not None and self.projector is None:
            scores = self._layer_scores(layers, num_ckpts, train_dataloader, test_dataloader)
            check_finite(scores, "scores", hint="check the data and the checkpoints")
            return scores
        if layers is not None and self._dense():
            scores = self._grouped_scores(layers, num_ckpts, train_dataloader, test_dataloader, row_offset)
            check_finite(scores, "scores", hint="check the data and the checkpoints")
            return scores
        scores = sum_over_checkpoints(
            num_ckpts,
            train_dataloader,
            test_dataloader,
            self.device,
            test_side=lambda k: self._test_matrix(k, test_dataloader),
            train_rep=lambda k, batch: self._raw_rep(k, batch, target=False),
            finish=lambda _k, rep: self._normalize(rep),
            row_offset=row_offset,
            weight=lambda k: float(self.weight_list[k]),
            store=self._store,
        )
        check_finite(scores, "scores", hint="check the data and the checkpoints")
        return scores

    def _self_scores(self, train_dataloader: DataLoader) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        num_ckpts = len(self.task.get_checkpoints())
        if num_ckpts != len(self.weight_list):
            msg = (
                f"weight_list has {len(self.weight_list)} entries but the task has {num_ckpts} "
                "checkpoints; give one weight per checkpoint"
            )
            raise ConfigError(msg)
        layers = self._choose_backend(train_dataloader)
        parts = []
        for ckpt_idx in range(num_ckpts):
            if layers is not None and self._dense():  # batches grouped: the matrix drawn once per group
                entries = ((None, b, False) for b in track(train_dataloader, "self-influence"))
                stream = layers.feature_stream(self.projector, ckpt_idx, entries, self.layer_buffer_bytes)
                norms = [self._normalize(rep).square().sum(dim=1) for _, rep in stream]
                parts.append(float(self.weight_list[ckpt_idx]) * torch.cat(norms))
                continue
            if layers is not None and self.projector is None:
                norms = []
                for b in track(train_dataloader, "self-influence"):
                    sq = sq_norms(layers.captures(ckpt_idx, b, target=False)).float()
                    norms.append(sq / sq.sqrt().clamp_min(NORM_EPS).square() if self.normalized_grad else sq)
                parts.append(float(self.weight_list[ckpt_idx]) * torch.cat(norms))
                continue
            norms = [
                self._rep(ckpt_idx, b, target=False).square().sum(dim=1)  # one batch's reps at a time
                for b in track(train_dataloader, "self-influence")
            ]
            parts.append(float(self.weight_list[ckpt_idx]) * torch.cat(norms))
        out = torch.stack(parts).sum(dim=0)
        check_finite(out, "self-influence scores", hint="check the data and the checkpoints")
        return out

    # -- the layers backend with a dense projection -----------------------------------------------

    def _dense(self) -> bool:
        """Whether features are a dense random projection (drawn chunk by chunk, worth grouping batches)."""
        return isinstance(self.projector, RandomProjector) and self.projector.proj_type != "identity"

    def _grouped_scores(
        self,
        layers: LayerGradients,
        num_ckpts: int,
        train_dataloader: DataLoader,
        test_dataloader: DataLoader,
        row_offset: int,
    ) -> Tensor:
        """:func:`sum_over_checkpoints` for a dense projection on the layers, one matrix draw per group.

        Per checkpoint, the test batches (unless remembered) and then the training batches
        form one :meth:`LayerGradients.feature_stream`: their captures are projected together
        in groups of ``layer_buffer_bytes``, so each chunk of the checkpoint's matrix is drawn
        once per group instead of once per batch and side (a whole small run: once). A batch's
        features are the same bits as projected alone; stored training blocks are read, not
        recomputed, and the scores are added in the same order as the batch-by-batch path.
        """
        scores: Optional[Tensor] = None
        for ckpt_idx in range(num_ckpts):
            store = self._store(ckpt_idx)
            memo = self.test_side_memo
            test_rep = memo.peek(ckpt_idx, test_dataloader) if memo is not None else None
            weight = float(self.weight_list[ckpt_idx])

            def entries(
                need_test: bool, store: Optional[BlockStore] = store
            ) -> Iterator[Tuple[Tuple[str, int, Optional[Tensor]], Optional[Any], bool]]:
                if need_test:
                    for batch in track(test_dataloader, "test gradients"):
                        yield ("test", 0, None), batch, True
                row = 0
                for batch in track(train_dataloader, "scoring train batches"):
                    n = batch_size_of(batch)
                    name = block_name(row_offset + row, row_offset + row + n)
                    stored = store.lookup(name) if store is not None else None
                    yield ("train", row, stored), (batch if stored is None else None), False
                    row += n

            test_parts: List[Tensor] = []
            stream = layers.feature_stream(
                self.projector, ckpt_idx, entries(test_rep is None), self.layer_buffer_bytes
            )
            for (side, row, stored), rep in stream:
                if side == "test":
                    test_parts.append(self._normalize(rep))
                    continue
                if test_rep is None:  # every test batch came first in the stream
                    test_rep = self._finished_test_side(ckpt_idx, test_dataloader, test_parts)
                if scores is None:
                    shape = (num_samples(train_dataloader), num_samples(test_dataloader))
                    scores = torch.zeros(shape, dtype=test_rep.dtype, device=self.device)
                if stored is not None:
                    rep = stored.to(str(test_rep.device))
                else:
                    if store is not None:
                        n = rep.shape[0]
                        store.put(block_name(row_offset + row, row_offset + row + n), rep)
                block = self._normalize(rep) @ test_rep.T
                if weight != 1.0:
                    block = block * weight
                scores[row : row + block.shape[0]] += block.to(scores.dtype)
            if scores is None:  # a training loader without batches
                if test_rep is None:
                    test_rep = self._finished_test_side(ckpt_idx, test_dataloader, test_parts)
                shape = (num_samples(train_dataloader), num_samples(test_dataloader))
                scores = torch.zeros(shape, dtype=test_rep.dtype, device=self.device)
        assert scores is not None
        return scores

    def _finished_test_side(self, ckpt_idx: int, test_dataloader: DataLoader, parts: List[Tensor]) -> Tensor:
        """The (normalised) test matrix from its batches, checked and remembered like :meth:`_test_matrix`."""
        test_rep = torch.cat(parts)
        check_finite(test_rep, "test gradients", hint="check the test data and the checkpoint")
        return remembered(self.test_side_memo, ckpt_idx, test_dataloader, lambda: test_rep)

    # -- the layers backend without a projection ---------------------------------------------------

    def _layer_test_side(
        self, layers: LayerGradients, ckpt_idx: int, test_dataloader: DataLoader
    ) -> List[Tuple[Dict[str, LayerCapture], Dict[str, Tensor], Optional[Tensor]]]:
        """Per test batch: its captures, a cache of its materialised layer gradients, its norms."""

        def compute() -> List[Tuple[Dict[str, LayerCapture], Dict[str, Tensor], Optional[Tensor]]]:
            side = []
            for batch in track(test_dataloader, "test gradients (layers)"):
                caps = layers.captures(ckpt_idx, batch, target=True)
                norms = sq_norms(caps).float().sqrt() if self.normalized_grad else None
                if norms is not None:
                    check_finite(norms, "test gradients", hint="check the test data and the checkpoint")
                side.append((caps, {}, norms))
            return side

        return remembered(self.test_side_memo, ckpt_idx, test_dataloader, compute)

    def _layer_block(
        self,
        caps: Dict[str, LayerCapture],
        test_side: List[Tuple[Dict[str, LayerCapture], Dict[str, Tensor], Optional[Tensor]]],
    ) -> Tensor:
        """``(B, n_test)`` inner products (cosines with ``normalized_grad``), summed over layers in float32."""
        norms = sq_norms(caps).float().sqrt().clamp_min(NORM_EPS) if self.normalized_grad else None
        cols = []
        for test_caps, cache, test_norms in test_side:
            per_layer = inner_products(caps, test_caps, per_layer=True, right_cache=cache)
            block = sum(v.float() for v in per_layer.values())
            if norms is not None and test_norms is not None:
                block = block / (norms[:, None] * test_norms.clamp_min(NORM_EPS)[None, :])
            cols.append(block)
        return torch.cat(cols, dim=1)

    def _layer_scores(
        self,
        layers: LayerGradients,
        num_ckpts: int,
        train_dataloader: DataLoader,
        test_dataloader: DataLoader,
    ) -> Tensor:
        """``sum_k w_k <g_k(train_i), g_k(test_j)>`` from the layers, streamed over training batches."""
        shape = (num_samples(train_dataloader), num_samples(test_dataloader))
        scores = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for ckpt_idx in range(num_ckpts):
            test_side = self._layer_test_side(layers, ckpt_idx, test_dataloader)
            weight = float(self.weight_list[ckpt_idx])
            row = 0
            for batch in track(train_dataloader, "scoring train batches (layers)"):
                n = batch_size_of(batch)
                block = self._layer_block(layers.captures(ckpt_idx, batch, target=False), test_side)
                scores[row : row + n] += block * weight if weight != 1.0 else block
                row += n
        return scores
