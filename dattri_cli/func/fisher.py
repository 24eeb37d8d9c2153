"""DataInf: a closed-form inverse of the damped, layer-wise empirical Fisher.

For one layer with per-sample training gradients ``g_i`` (``i = 1..n``) and
regularization ``r``, DataInf replaces ``(F + r I)^-1`` by the average of the
per-sample inverses ``(g_i g_i^T + r I)^-1``, each known by Sherman-Morrison::

    q(v) = 1/n * sum_i (g_i g_i^T + r I)^-1 v
         = (v - 1/n * sum_i  (g_i . v) / (r + |g_i|^2) * g_i) / r

Layers are independent (a block-diagonal approximation). The sum is accumulated
from chunks of training gradients as ``(V G^T / (r + |g|^2)) G``, so memory is
``num_test x P`` plus one chunk: no ``P x P`` matrix is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from dattri_cli import distributed
from dattri_cli.errors import ConfigError


def check_datainf_regularization(regularization: float) -> None:
    """DataInf divides by ``regularization``: zero or negative is a user error."""
    if not regularization > 0:
        msg = (
            f"DataInf needs a positive `regularization` (got {regularization}): each rank-one "
            "per-sample Fisher is singular without it; set e.g. regularization=0.1"
        )
        raise ConfigError(msg)


@dataclass
class DataInfAccumulator:
    """Accumulates the DataInf transform of fixed test vectors over training-gradient chunks.

    ``layer_sizes`` split the flat parameter vector into layers (in order).
    Call :meth:`add` with ``(chunk, P)`` training gradients until all ``n`` training
    samples are seen, then :meth:`result` gives the transformed ``(k, P)`` rows.
    """

    test_rep: Tensor
    layer_sizes: Sequence[int]
    regularization: float
    count: int = 0
    _correction: List[distributed.OrderedSum] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_datainf_regularization(self.regularization)
        if sum(self.layer_sizes) != self.test_rep.shape[1]:
            msg = f"layer sizes sum to {sum(self.layer_sizes)}, representations have {self.test_rep.shape[1]} entries"
            raise ValueError(msg)
        self._tests = self.test_rep.split(list(self.layer_sizes), dim=1)
        # per-chunk sums folded in global chunk order (the same bits under torchrun)
        self._correction = [distributed.OrderedSum(torch.zeros_like(t)) for t in self._tests]

    def add(self, train_grads: Tensor) -> None:
        """Add ``sum_i (g_i . v) / (r + |g_i|^2) g_i`` for a chunk of training gradients."""
        grads = train_grads.to(self.test_rep.dtype).split(list(self.layer_sizes), dim=1)
        for acc, test, g in zip(self._correction, self._tests, grads):
            coeff = (test @ g.T) / (self.regularization + (g * g).sum(dim=1))
            acc.add(coeff @ g)
        self.count += train_grads.shape[0]

    def result(self) -> Tensor:
        """The transformed test rows ``(k, P)``."""
        # under torchrun each rank saw its own training rows: sum the corrections over ranks
        count = distributed.reduce_count(self.count, str(self.test_rep.device))
        corrections = [acc.result() for acc in self._correction]
        if count == 0:
            msg = "DataInf saw no training gradients"
            raise ValueError(msg)
        layers = [(t - acc / count) / self.regularization for t, acc in zip(self._tests, corrections)]
        return torch.cat(layers, dim=1)


def datainf_ifvp(
    train_grads: Tensor,
    test_rep: Tensor,
    layer_sizes: Sequence[int],
    regularization: float,
    chunk_size: int = 1024,
) -> Tensor:
    """DataInf inverse-Fisher-vector products of the rows of ``test_rep`` (all in memory)."""
    acc = DataInfAccumulator(test_rep, layer_sizes, regularization)
    for chunk in train_grads.split(chunk_size, dim=0):
        acc.add(chunk)
    return acc.result()


def layer_sizes_from_map(param_sizes: Sequence[int], layer_of: Sequence[int]) -> List[int]:
    """Sum per-parameter sizes into per-layer sizes given each parameter's layer index."""
    sizes: Dict[int, int] = {}
    for size, layer in zip(param_sizes, layer_of):
        sizes[layer] = sizes.get(layer, 0) + int(size)
    return [sizes[k] for k in sorted(sizes)]
