"""A user's own loss for ``task=custom``, written in dattri's convention (used by the config tests)."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import Tensor, nn


def make_loss(model: nn.Module, sample_ndim: int = 1) -> Callable[[Dict[str, Tensor], Any], Tensor]:
    """Mean absolute error of the model's output against float targets (a sample: made a batch of one)."""

    def loss(params: Dict[str, Tensor], data: Any) -> Tensor:
        x, y = data
        if x.dim() == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        pred = torch.func.functional_call(model, params, (x,)).reshape(y.shape[0], -1)
        return (pred - y.to(pred.dtype).reshape(pred.shape)).abs().mean()

    return loss
