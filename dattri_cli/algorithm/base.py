"""Base classes shared by the attributors.

An inner-product attributor scores a (train, test) pair as
``<transform_train_rep(g_train), transform_test_rep(g_test)>`` and averages over
checkpoints. This base computes and transforms the test side once per checkpoint
(one batched transform for all test samples), then streams the training set in
batches, so memory is bounded by the batch sizes and the test-side matrix.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dattri_cli.algorithm.utils import (
    batch_size_of,
    check_finite,
    check_not_shuffled,
    num_samples,
    to_device,
)
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import BlockStore, block_name
from dattri_cli.func.batch import add_leading_dim
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask

T = TypeVar("T")


@dataclass(frozen=True)
class TrainRows:
    """Training rows ``[start, stop)`` (positions in the full training set) and a loader over them."""

    loader: DataLoader
    start: int
    stop: int


class Attributor(ABC):
    """The contract between the runner and an attributor.

    The runner calls three methods, in this order:

    * :meth:`prepare` with the training rows this process caches (the full training set,
      or under torchrun this rank's rows, whose full-set sums the attributor all-reduces);
    * :meth:`score_rows` once per block of training rows (one block unless a run writes
      row-block files), returning ``(rows, num_test)`` scores;
    * :meth:`self_scores` when ``attributor.runner.self_influence`` asks for it.

    What an attributor can do is declared by the class attributes below; the runner reads
    them and never probes an instance. The public dattri-style methods (``cache``,
    ``attribute``, ``self_attribute``) of each subclass are thin wrappers over the same code.
    """

    #: full-training-set quantities are all-reduced, so torchrun ranks may split the rows
    splits_over_ranks: ClassVar[bool] = False
    #: the test side is computed through ``test_side_memo`` (kept across row blocks when set)
    keeps_test_side: ClassVar[bool] = False
    #: dtype scores are accumulated in before the float32 result (None: the parameters' dtype)
    accumulator_dtype: ClassVar[Optional[torch.dtype]] = None
    #: ``diagnostics`` (solver residuals, conditioning) is recorded in the score file
    has_diagnostics: ClassVar[bool] = False
    #: train-side blocks are kept through ``feature_store`` when the runner sets one
    uses_feature_store: ClassVar[bool] = False
    #: :meth:`self_scores` is implemented
    has_self_scores: ClassVar[bool] = False
    #: parameters attributed (None: all); part of the feature-cache key
    layer_name: Optional[Union[str, List[str]]] = None

    def _init_hooks(self) -> None:
        """The fields the runner may set; every subclass's ``__init__`` calls this."""
        #: ``f(kind, ckpt_idx, extra) -> BlockStore`` keeping train-side blocks (None: none kept)
        self.feature_store: Optional[Callable[..., BlockStore]] = None
        #: absolute train row of the first sample of the loader given to ``attribute`` (or TRAK's ``cache``)
        self.train_row_offset = 0
        #: test-side results kept across ``attribute`` calls (set by a run writing row blocks)
        self.test_side_memo: Optional[TestSideMemo] = None
        #: solver diagnostics recorded in the score file (JSON-serialisable)
        self.diagnostics: Dict[str, Any] = {}

    @abstractmethod
    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:
        """Precompute what depends on the training set; its first row is training row ``row_offset``."""

    @abstractmethod
    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores ``(rows.stop - rows.start, num_test)`` of the given training rows, after :meth:`prepare`."""

    def self_scores(self, train_dataloader: DataLoader) -> Tensor:  # noqa: ARG002
        """Self-influence ``score(i, i)`` of every training sample, ``(num_train,)``."""
        msg = f"{type(self).__name__} has no self_attribute; drop attributor.runner.self_influence"
        raise ConfigError(msg)

    def check_rank_split(self) -> None:
        """Refuse torchrun (ranks splitting the training rows) unless the class supports it."""
        if not self.splits_over_ranks:
            name = type(self).__name__
            msg = (
                f"{name} does not support torchrun (ranks splitting the training set): its full-training-set "
                "statistics are not all-reduced. Use shard.index/shard.count instead"
            )
            raise ConfigError(msg)


#: The name the attributors of dattri 0.3.0 derive from.
BaseAttributor = Attributor


def stream_train_scores(
    train_dataloader: DataLoader,
    train_rep_func: Callable[[Tuple[Tensor, ...]], Tensor],
    test_rep: Tensor,
    out: Tensor,
    weight: float = 1.0,
    description: str = "scoring train batches",
    store: Optional[BlockStore] = None,
    row_offset: int = 0,
    finish: Optional[Callable[[Tensor], Tensor]] = None,
    row_weights: Optional[Tensor] = None,
) -> None:
    """Add ``weight * finish(train_rep_func(batch)) @ test_rep.T`` into the rows of ``out``.

    ``row_weights`` (one per row of ``out``) scale each training row's scores.

    Rows follow the loader's order; ``out`` has one row per training sample. With a
    ``store``, ``train_rep_func(batch)`` is looked up (or computed and kept) under the
    batch's absolute rows ``row_offset + [row, row + n)``; ``finish`` (identity if
    None) is applied afterwards, so stored representations can serve other transforms.
    """
    row = 0
    for batch in track(train_dataloader, description):
        if store is None:
            train_rep = train_rep_func(batch)
        else:
            n = batch_size_of(batch)
            name = block_name(row_offset + row, row_offset + row + n)
            train_rep = store.get_or_compute(
                name, lambda b=batch: train_rep_func(b), device=str(test_rep.device)
            )
        if finish is not None:
            train_rep = finish(train_rep)
        block = train_rep @ test_rep.T
        if weight != 1.0:
            block = block * weight
        if row_weights is not None:
            block = block * row_weights[row : row + block.shape[0], None].to(block.dtype)
        out[row : row + block.shape[0]] += block.to(out.dtype)
        row += block.shape[0]


def sum_over_checkpoints(
    num_ckpts: int,
    train_dataloader: DataLoader,
    test_dataloader: DataLoader,
    device: str,
    test_side: Callable[[int], Tensor],
    train_rep: Callable[[int, Any], Tensor],
    finish: Callable[[int, Tensor], Tensor],
    row_offset: int = 0,
    weight: Callable[[int], float] = lambda _k: 1.0,
    store: Callable[[int], Optional[BlockStore]] = lambda _k: None,
    row_weights: Callable[[int], Optional[Tensor]] = lambda _k: None,
) -> Tensor:
    """``sum_k weight(k) * finish(k, train_rep(k, batch)) @ test_side(k).T``, streamed over train batches.

    The gradient -> transform -> inner-product loop every gradient-based attributor runs:
    ``test_side(k)`` is the transformed test matrix of checkpoint ``k`` (computed once),
    ``train_rep(k, batch)`` the raw train representation (kept in ``store(k)`` when one is
    given, under absolute rows from ``row_offset``), ``finish`` its transform. The scores
    take the test side's dtype and live on ``device``.
    """
    scores = None
    for ckpt_idx in range(num_ckpts):
        test_rep = test_side(ckpt_idx)
        if scores is None:  # the representations' dtype, never a hard-coded one
            shape = (num_samples(train_dataloader), num_samples(test_dataloader))
            scores = torch.zeros(shape, dtype=test_rep.dtype, device=device)
        stream_train_scores(
            train_dataloader,
            lambda batch, k=ckpt_idx: train_rep(k, batch),
            test_rep,
            scores,
            weight=weight(ckpt_idx),
            store=store(ckpt_idx),
            row_offset=row_offset,
            finish=lambda rep, k=ckpt_idx: finish(k, rep),
            row_weights=row_weights(ckpt_idx),
        )
    return scores


class TestSideMemo:
    """Test-side results per checkpoint, kept while the training rows are scored block by block.

    A run that writes its scores as row blocks calls ``attribute`` once per block with
    the same test loader; the test gradients and their transform (an inverse-Hessian
    solve, TRAK's kernel solve) do not depend on the rows, so they are computed on the
    first block and reused. Entries are keyed by checkpoint index and the test loader's
    identity; the loader is held, so its ``id`` cannot be reused by another object.
    """

    __test__ = False  # a name pytest would otherwise try to collect

    def __init__(self) -> None:
        """Start empty."""
        self._entries: Dict[Tuple[int, int], Tuple[Any, Any]] = {}

    def get(self, ckpt_idx: int, test_dataloader: Any, compute: Callable[[], T]) -> T:
        """The value kept for ``(ckpt_idx, test_dataloader)``, computed by ``compute()`` on first use."""
        key = (ckpt_idx, id(test_dataloader))
        entry = self._entries.get(key)
        if entry is not None and entry[0] is test_dataloader:
            return entry[1]
        value = compute()
        self._entries[key] = (test_dataloader, value)
        return value

    def peek(self, ckpt_idx: int, test_dataloader: Any) -> Optional[Any]:
        """The value kept for ``(ckpt_idx, test_dataloader)``, or None (nothing is computed)."""
        entry = self._entries.get((ckpt_idx, id(test_dataloader)))
        return entry[1] if entry is not None and entry[0] is test_dataloader else None

    def __len__(self) -> int:
        """Number of kept entries."""
        return len(self._entries)


def remembered(
    memo: Optional[TestSideMemo], ckpt_idx: int, test_dataloader: Any, compute: Callable[[], T]
) -> T:
    """``compute()``, through ``memo`` when one is set (an attributor's ``test_side_memo``)."""
    if memo is None:
        return compute()
    return memo.get(ckpt_idx, test_dataloader, compute)


class BaseInnerProductAttributor(Attributor):
    """Scores as inner products of (transformed) train and test representations.

    Nothing it computes in :meth:`prepare` sums over the training set, so torchrun ranks
    may split the rows; a subclass that adds such a sum all-reduces it (see
    :mod:`dattri_cli.distributed`) or sets ``splits_over_ranks = False``.
    """

    splits_over_ranks = True
    keeps_test_side = True
    uses_feature_store = True
    has_self_scores = True

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
    ) -> None:
        """Attribute ``task`` using the parameters named in ``layer_name`` (all if None)."""
        if not isinstance(task, AttributionTask):
            msg = f"task must be an AttributionTask, got {type(task).__name__}"
            raise TypeError(msg)
        self.task = task
        self.layer_name = layer_name
        self.device = device or "cpu"
        self.full_train_dataloader: Optional[DataLoader] = None
        self._init_hooks()

    # -- representations ----------------------------------------------------------
    def _params(self, ckpt_idx: int) -> Tensor:
        params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        return params.to(self.device)

    def generate_test_rep(self, ckpt_idx: int, data: Tuple[Tensor, ...]) -> Tensor:
        """Per-sample gradients of the target function, ``(batch_size, num_params)``.

        ``data`` tensors have shape ``(1, batch_size, ...)`` as in the reference API:
        the target function sees each sample as a batch of one.
        """
        grad_func = self.task.get_grad_target_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        return grad_func(self._params(ckpt_idx), data)

    def generate_train_rep(self, ckpt_idx: int, data: Tuple[Tensor, ...]) -> Tensor:
        """Per-sample gradients of the loss function, ``(batch_size, num_params)``.

        ``data`` tensors have shape ``(1, batch_size, ...)`` as in the reference API:
        the loss function sees each sample as a batch of one.
        """
        grad_func = self.task.get_grad_loss_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        return grad_func(self._params(ckpt_idx), data)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:  # noqa: ARG002
        """Transform test representations (identity here; e.g. inverse Hessian in IF)."""
        return test_rep

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:  # noqa: ARG002
        """Transform train representations (identity here; e.g. a projection)."""
        return train_rep

    # -- workflow (the runner's contract) -------------------------------------------------------
    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:  # noqa: ARG002
        """Remember the full training set; subclasses precompute from it (the offset plays no part)."""
        check_not_shuffled(train_dataloader, "full_train_dataloader")
        self.full_train_dataloader = train_dataloader

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores of ``rows`` (their loader streamed, their absolute rows naming stored blocks)."""
        return self._scores(rows.loader, test_dataloader, rows.start)

    def self_scores(self, train_dataloader: DataLoader) -> Tensor:
        """Self-influence of every training sample (see :meth:`self_attribute`)."""
        return self._self_scores(train_dataloader)

    # -- the dattri-style API -------------------------------------------------------------------
    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Precompute what depends on the full training set (:meth:`prepare`)."""
        self.prepare(full_train_dataloader)

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        """Scores ``(num_train, num_test)`` averaged over the task's checkpoints."""
        return self._scores(train_dataloader, test_dataloader, self.train_row_offset)

    def self_attribute(self, train_dataloader: DataLoader) -> Tensor:
        """Self-influence ``score(i, i)`` of every training sample, shape ``(num_train,)``.

        Computed batch by batch without forming the train x train matrix.
        """
        return self._self_scores(train_dataloader)

    def _ensure_cached(self, train_dataloader: DataLoader) -> None:
        if self.full_train_dataloader is None:
            warnings.warn(
                "cache() was not called: treating train_dataloader as the full training set",
                stacklevel=3,
            )
            self.cache(train_dataloader)

    def _test_matrix(self, ckpt_idx: int, test_dataloader: DataLoader) -> Tensor:
        """Transformed test representations for all test samples of one checkpoint (memoised if asked)."""
        return remembered(
            self.test_side_memo,
            ckpt_idx,
            test_dataloader,
            lambda: self._compute_test_matrix(ckpt_idx, test_dataloader),
        )

    def _compute_test_matrix(self, ckpt_idx: int, test_dataloader: DataLoader) -> Tensor:
        """Test gradients of one checkpoint, batched through ``transform_test_rep`` once."""
        reps = [
            self.generate_test_rep(ckpt_idx, add_leading_dim(to_device(b, self.device))).detach()
            for b in track(test_dataloader, "test gradients")
        ]
        test_rep = torch.cat(reps)
        check_finite(test_rep, "test gradients", hint="check the test data and the checkpoint")
        transformed = self.transform_test_rep(ckpt_idx, test_rep).detach()
        check_finite(transformed, "test-side transform", hint="increase `regularization`")
        return transformed

    def _train_rep(self, ckpt_idx: int, batch: Tuple[Tensor, ...]) -> Tensor:
        return self.transform_train_rep(ckpt_idx, self._raw_train_rep(ckpt_idx, batch)).detach()

    def _raw_train_rep(self, ckpt_idx: int, batch: Tuple[Tensor, ...]) -> Tensor:
        data = add_leading_dim(to_device(batch, self.device))
        return self.generate_train_rep(ckpt_idx, data).detach()

    def _grad_store(self, ckpt_idx: int) -> Optional[BlockStore]:
        """Where this checkpoint's raw training gradients are kept, if anywhere.

        Only the base gradient is stored: subclasses overriding ``generate_train_rep``
        produce something else and are not cached under the gradient key.
        """
        if (
            self.feature_store is None
            or type(self).generate_train_rep is not BaseInnerProductAttributor.generate_train_rep
        ):
            return None
        # keyed by the calling convention too: TracIn's per-sample calls run the user's function
        # differently (and may differ in the last bits), so the two never share gradients
        return self.feature_store("train_grads", ckpt_idx, {"projection": None, "calls": "batch_of_one"})

    def _scores(self, train_dataloader: DataLoader, test_dataloader: DataLoader, row_offset: int) -> Tensor:
        """Scores of the loader's rows (the first is row ``row_offset``), averaged over checkpoints."""
        check_not_shuffled(train_dataloader, "train_dataloader")
        check_not_shuffled(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        num_ckpts = len(self.task.get_checkpoints())
        scores = sum_over_checkpoints(
            num_ckpts,
            train_dataloader,
            test_dataloader,
            self.device,
            test_side=lambda k: self._test_matrix(k, test_dataloader),
            train_rep=self._raw_train_rep,
            finish=lambda k, rep: self.transform_train_rep(k, rep).detach(),
            row_offset=row_offset,
            store=self._grad_store,
            row_weights=lambda k: self._row_weights(k, train_dataloader),
        )
        scores /= num_ckpts
        check_finite(scores, "scores", hint="increase `regularization`")
        return scores

    def _row_weights(self, ckpt_idx: int, train_dataloader: DataLoader) -> Optional[Tensor]:  # noqa: ARG002
        """Per-training-row factors on one checkpoint's scores (None: all ones; RelatIF divides)."""
        return None

    def _self_scores(self, train_dataloader: DataLoader) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        num_ckpts = len(self.task.get_checkpoints())
        out = torch.zeros(num_samples(train_dataloader), dtype=self._params(0).dtype, device=self.device)
        for ckpt_idx in range(num_ckpts):
            row = 0
            weights = self._row_weights(ckpt_idx, train_dataloader)
            for batch in track(train_dataloader, "self-influence"):
                data = add_leading_dim(to_device(batch, self.device))
                train_rep = self._train_rep(ckpt_idx, batch)
                test_rep = self.transform_test_rep(ckpt_idx, self.generate_test_rep(ckpt_idx, data).detach())
                n = batch_size_of(batch)
                values = (train_rep * test_rep).sum(dim=1)
                if weights is not None:
                    values = values * weights[row : row + n].to(values.dtype)
                out[row : row + n] += values
                row += n
        out /= num_ckpts
        check_finite(out, "self-influence scores", hint="increase `regularization`")
        return out
