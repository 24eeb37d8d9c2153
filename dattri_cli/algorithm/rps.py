"""Representer point selection (Yeh et al., 2018).

The final linear layer ``logits = Theta x`` (bias ignored, as in dattri) is
fine-tuned from its trained weights on the training features ``x_i`` with soft
targets ``y_i`` = the trained model's own predictions, under the task's loss
(``final_layer_loss``; the CLI passes the task group's):

    L(Theta) = mean_i l(Theta x_i, y_i) + l2_strength * ||Theta||_F^2

* ``cross_entropy`` (task=classification, dattri's RPS): ``y_i`` the predicted
  probabilities, ``l`` the cross-entropy (binary, with a sigmoid, for one output);
* ``squared_error`` (task=regression): ``y_i`` the model's outputs, ``l`` the task's
  squared error ``mean_d (z_d - y_d)^2``; one output per sample (a scalar score).

Other losses (language models, a model's own loss, custom tasks) have no closed-form
representer fit here and are refused. At a stationary point
``Theta* = sum_i a_i x_i^T`` with ``a_i = -dl_i/dz (Theta* x_i) / (2 * l2_strength * n)``:
the representer theorem. Following dattri 0.3.0's scale, the reported weights are
``alpha_i = a_i / n``, and

    score(i, j) = alpha_i[label_j] * <x_i, x_j>      (alpha_i[0] for one output)

(cosine of the features with ``normalize_preactivate``), so that
``n * sum_i score(i, j) = (Theta* x_j)[label_j]``. The problem is strictly
convex, so Newton's method in float64 (analytic Hessian-vector products, CG
steps; :mod:`dattri_cli.func.representer`) reaches the optimum deterministically
in about ten steps; a residual check warns when it did not. Under torchrun the
training-set sums of the fine-tuning objective are all-reduced, so each rank
scores its rows against the same weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize
from torch.utils.data import DataLoader

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor, TrainRows, remembered
from dattri_cli.algorithm.utils import check_finite, check_not_shuffled, num_samples
from dattri_cli.errors import ConfigError
from dattri_cli.func.representer import (  # noqa: F401 - re-exported: their home before func/representer.py
    FinalLayerObjective,
    check_loss,
    finetune_final_layer,
    representer_coefficients,
    soft_targets,
)
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask

#: Relative representer residual ``||Theta - sum_i a_i x_i^T|| / ||Theta||`` accepted as converged.
CONVERGENCE_TOL = 1e-4


@dataclass
class FinalLayerIO:
    """Inputs (features), outputs (logits) and labels of the final linear layer."""

    features: Tensor  # (n, h) float64
    logits: Tensor  # (n, c) float64
    labels: Tensor  # (n,) long


class RPSAttributor(Attributor):
    """Representer point selection on the final linear layer, averaged over checkpoints."""

    splits_over_ranks = True  # the fine-tuning objective and the row count are all-reduced
    keeps_test_side = True
    accumulator_dtype = torch.float64
    has_diagnostics = True

    def __init__(
        self,
        task: AttributionTask,
        final_linear_layer_name: str,
        normalize_preactivate: bool = False,
        l2_strength: float = 0.003,
        epoch: int = 3000,
        device: str = "cpu",
        final_layer_loss: str = "cross_entropy",
    ) -> None:
        """Store settings; ``epoch`` bounds the Newton steps of the fine-tuning (about 10 are needed).

        ``final_layer_loss``: ``"cross_entropy"`` (dattri's RPS) or ``"squared_error"``
        (regression, one output); the CLI sets it from ``task``.
        """
        if l2_strength <= 0:
            msg = f"l2_strength must be positive (the representer theorem needs it), got {l2_strength}"
            raise ConfigError(msg)
        try:
            check_loss(final_layer_loss)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.final_layer_loss = final_layer_loss
        self.task = task
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = normalize_preactivate
        self.l2_strength = float(l2_strength)
        self.epoch = int(epoch)
        self.device = device or "cpu"
        self.full_train_dataloader: Optional[DataLoader] = None
        self.finetuned_theta: List[Tensor] = []
        self.num_full_train = 0
        self._init_hooks()

    # -- features ------------------------------------------------------------------------------
    def _final_layer(self) -> nn.Module:
        try:
            layer = self.task.get_model().get_submodule(self.final_linear_layer_name)
        except AttributeError as exc:
            msg = f"final_linear_layer_name {self.final_linear_layer_name!r} is not a submodule of the model"
            raise ConfigError(msg) from exc
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            msg = f"final_linear_layer_name {self.final_linear_layer_name!r} is not a linear layer (needs a 2-d weight)"
            raise ConfigError(msg)
        return layer

    def _layer_io(self, ckpt_idx: int, loader: DataLoader) -> FinalLayerIO:
        """Run the model over ``loader`` and capture the final layer's inputs and outputs."""
        self.task.named_parameters(ckpt_idx)  # loads the checkpoint into the model
        model = self.task.get_model()
        model_device = next(model.parameters()).device
        captured: List[Tuple[Tensor, Tensor]] = []

        def hook(_module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
            captured.append((inputs[0].detach().flatten(1), output.detach().flatten(1)))

        handle = self._final_layer().register_forward_hook(hook)
        labels = []
        try:
            with torch.no_grad():
                for batch in track(loader, f"RPS features (checkpoint {ckpt_idx})"):
                    model(*(t.to(model_device) for t in batch[:-1]))
                    labels.append(batch[-1].reshape(-1))
        finally:
            handle.remove()
        features = torch.cat([f for f, _ in captured]).to(self.device, torch.float64)
        logits = torch.cat([o for _, o in captured]).to(self.device, torch.float64)
        return FinalLayerIO(features, logits, torch.cat(labels).to(self.device).long())

    # -- the runner's contract ----------------------------------------------------------------------
    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:  # noqa: ARG002
        """Fine-tune the final layer of every checkpoint on the training set (see :meth:`cache`)."""
        self._cache(train_dataloader)

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores of the rows' loader (see :meth:`attribute`)."""
        return self._scores(rows.loader, test_dataloader)

    # -- the dattri-style API -------------------------------------------------------------------------
    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Fine-tune the final layer of every checkpoint on the full training set."""
        self.prepare(full_train_dataloader)

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        """Scores ``(num_train, num_test)``: ``alpha_i[label_j] * <x_i, x_j>``, averaged over checkpoints."""
        return self._scores(train_dataloader, test_dataloader)

    # -- computation ----------------------------------------------------------------------------------
    def _cache(self, full_train_dataloader: DataLoader) -> None:
        check_not_shuffled(full_train_dataloader, "full_train_dataloader")
        self.finetuned_theta = []
        residuals = []
        for ckpt_idx in range(len(self.task.get_checkpoints())):
            io = self._layer_io(ckpt_idx, full_train_dataloader)
            self._check_outputs(io)
            init = self._final_layer().weight.detach().to(self.device)
            theta, residual = finetune_final_layer(
                io.features,
                soft_targets(io.logits, self.final_layer_loss),
                init,
                self.l2_strength,
                self.epoch,
                loss=self.final_layer_loss,
            )
            check_finite(theta, "RPS fine-tuned weights", hint="increase l2_strength")
            if residual > CONVERGENCE_TOL:
                warnings.warn(
                    f"RPS fine-tuning of checkpoint {ckpt_idx} stopped before convergence (representer "
                    f"residual {residual:.2e} > {CONVERGENCE_TOL:.0e}); increase `epoch` or `l2_strength`",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.finetuned_theta.append(theta)
            residuals.append(residual)
        self.diagnostics = {"representer_residual": residuals, "converged": max(residuals) <= CONVERGENCE_TOL}
        self.num_full_train = distributed.reduce_count(num_samples(full_train_dataloader), self.device)
        self.full_train_dataloader = full_train_dataloader

    def _check_outputs(self, io: FinalLayerIO) -> None:
        """Squared error scores one output: a wider layer has no single value to attribute."""
        width = io.logits.shape[1]
        if self.final_layer_loss == "squared_error" and width != 1:
            msg = (
                f"RPS with final_layer_loss='squared_error' (task=regression) needs one output per sample, "
                f"but final_linear_layer_name {self.final_linear_layer_name!r} has {width}; "
                "use attributor=grad_dot, trak or if_ekfac for several regression targets"
            )
            raise ConfigError(msg)

    def representer_weights(self, ckpt_idx: int, io: FinalLayerIO) -> Tensor:
        """dattri-scaled ``alpha`` (``(n, c)``) of the samples in ``io`` for one checkpoint."""
        theta = self.finetuned_theta[ckpt_idx]
        # Coefficients are per sample; only the normalisation uses the fine-tuning set size.
        targets = soft_targets(io.logits, self.final_layer_loss)
        per_sample = representer_coefficients(
            theta, io.features, targets, self.l2_strength, self.final_layer_loss
        )
        return per_sample * io.features.shape[0] / self.num_full_train**2

    def _scores(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        check_not_shuffled(test_dataloader, "test_dataloader")
        if self.full_train_dataloader is None:
            warnings.warn(
                "cache() was not called: fine-tuning the final layer on train_dataloader", stacklevel=2
            )
            self.cache(train_dataloader)
        scores = None
        for ckpt_idx in range(len(self.finetuned_theta)):
            block = self._checkpoint_scores(ckpt_idx, train_dataloader, test_dataloader)
            scores = block if scores is None else scores + block
        scores = scores / len(self.finetuned_theta)
        check_finite(scores, "RPS scores", hint="increase l2_strength")
        return scores.to(torch.float32)

    def _checkpoint_scores(self, ckpt_idx: int, train_loader: DataLoader, test_loader: DataLoader) -> Tensor:
        train = self._layer_io(ckpt_idx, train_loader)
        test = remembered(
            self.test_side_memo, ckpt_idx, test_loader, lambda: self._layer_io(ckpt_idx, test_loader)
        )
        alpha = self.representer_weights(ckpt_idx, train)
        if alpha.shape[1] > 1:
            alpha = alpha[:, test.labels]  # the test sample's label picks the class
        x_train, x_test = train.features, test.features
        if self.normalize_preactivate:
            x_train, x_test = normalize(x_train, dim=1), normalize(x_test, dim=1)
        return (x_train @ x_test.T) * alpha
