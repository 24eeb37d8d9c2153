"""Influence functions: scores ``g_train^T (H + reg I)^-1 g_test``.

``H`` is the Hessian of the mean training loss over the full training set given
to ``cache``. Positive scores mean the training sample lowers the test target
(it helps), as in the public dattri library.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

from torch import Tensor
from torch.utils.data import DataLoader

from dattri_cli.algorithm.base import BaseInnerProductAttributor
from dattri_cli.func.hessian import SymmetricInverse, explicit_hessian, symmetric_inverse
from dattri_cli.task import AttributionTask


class IFAttributorExplicit(BaseInnerProductAttributor):
    """Influence with the exact Hessian, formed and inverted densely (small models)."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        regularization: float = 0.0,
    ) -> None:
        """Add ``regularization * I`` to the Hessian before inverting it."""
        super().__init__(task, layer_name, device)
        self.regularization = regularization
        self._inverse: Dict[int, SymmetricInverse] = {}
        self.diagnostics: Dict[str, Dict[str, float]] = {}

    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Remember the training set; the Hessian is formed once per checkpoint on use."""
        super().cache(full_train_dataloader)
        self._inverse = {}

    def _inverse_for(self, ckpt_idx: int) -> SymmetricInverse:
        if ckpt_idx not in self._inverse:
            # keep one checkpoint's factorization at a time: memory is P^2, not K * P^2
            self._inverse = {}
            func = self.task.get_loss_func(self.layer_name, ckpt_idx)
            hess = explicit_hessian(func, self._params(ckpt_idx), self.full_train_dataloader, self.device)
            inverse = symmetric_inverse(hess, self.regularization)
            self.diagnostics[f"checkpoint_{ckpt_idx}"] = inverse.diagnostics
            self._inverse[ckpt_idx] = inverse
        return self._inverse[ckpt_idx]

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(H + reg I)^-1 g`` for every row ``g`` of ``test_rep``."""
        return self._inverse_for(ckpt_idx).apply(test_rep)
