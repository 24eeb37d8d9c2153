"""TracIn, Grad-Dot and Grad-Cos: weighted sums of gradient inner products.

``score(i, j) = sum_k w_k <g_k(train_i), g_k(test_j)>`` over checkpoints ``k``
(cosine similarity instead of the inner product when ``normalized_grad``).
Grad-Dot / Grad-Cos are the one-checkpoint, unit-weight special cases.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.functional import normalize
from torch.utils.data import DataLoader

from dattri_cli.algorithm.base import Attributor, TrainRows, remembered, sum_over_checkpoints
from dattri_cli.algorithm.utils import (
    check_finite,
    check_not_shuffled,
    to_device,
)
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import BlockStore
from dattri_cli.func.batch import SAMPLE_IN_DIMS
from dattri_cli.func.projection import make_projector
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask


class TracInAttributor(Attributor):
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
    ) -> None:
        """Weights are learning rates for TracIn, ones for Grad-Dot / Grad-Cos.

        ``projector_kwargs=None`` scores the full gradients (exact); a dictionary,
        even an empty one, projects them with the defaults of
        :data:`dattri_cli.func.projection.DEFAULT_PROJECTOR_KWARGS` updated by it.
        """
        self.task = task
        self.weight_list = torch.as_tensor(weight_list, dtype=torch.float64).flatten()
        self.normalized_grad = normalized_grad
        self.projector_kwargs = dict(projector_kwargs) if projector_kwargs is not None else None
        self.projector = make_projector(self.projector_kwargs) if self.projector_kwargs is not None else None
        self.layer_name = layer_name
        self.device = device or "cpu"
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
        """Projected (not normalised) train gradients: shared by Grad-Dot, Grad-Cos and TracIn."""
        if self.feature_store is None:
            return None
        extra: Dict[str, Any] = {"projection": None, "calls": "sample"}
        if self.projector is not None:  # the projection is seeded by the checkpoint index
            extra = {"projection": self.projector_kwargs, "ckpt_idx": ckpt_idx, "calls": "sample"}
        return self.feature_store("train_grads", ckpt_idx, extra)

    def _normalize(self, rep: Tensor) -> Tensor:
        return normalize(rep, dim=1) if self.normalized_grad else rep

    def _raw_rep(self, ckpt_idx: int, batch: Any, target: bool) -> Tensor:
        params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        params = params.to(self.device)
        # dattri's convention: the functions see one sample without a batch dimension
        getter = self.task.get_grad_target_func if target else self.task.get_grad_loss_func
        grad_func = getter(in_dims=SAMPLE_IN_DIMS, layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        return self._project(ckpt_idx, grad_func(params, to_device(batch, self.device)).detach())

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
        parts = []
        for ckpt_idx in range(num_ckpts):
            norms = [
                self._rep(ckpt_idx, b, target=False).square().sum(dim=1)  # one batch's reps at a time
                for b in track(train_dataloader, "self-influence")
            ]
            parts.append(float(self.weight_list[ckpt_idx]) * torch.cat(norms))
        out = torch.stack(parts).sum(dim=0)
        check_finite(out, "self-influence scores", hint="check the data and the checkpoints")
        return out
