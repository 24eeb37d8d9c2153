"""A binary logistic-regression task shared by the TracIn and TRAK tests."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dattri_cli.task import AttributionTask

DIM = 5


def _data(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    y = (torch.rand(n, generator=gen) < 0.5).float()
    return x, y


def _checkpoint(seed: int) -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(1, DIM, generator=gen), "bias": torch.randn(1, generator=gen)}


def _task(checkpoints: List[Dict[str, Tensor]]) -> AttributionTask:
    model = nn.Linear(DIM, 1)

    def loss_func(params: Dict[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = functional_call(model, params, (x,)).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, y)

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)
