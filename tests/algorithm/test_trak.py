"""TRAK against its closed form on logistic regression."""

from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.feature_cache import BlockStore
from tests.algorithm.binary_logistic import _checkpoint, _data, _task

IDENTITY = {"proj_type": "identity"}


def _correct_probability(params: Dict[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
    """p(correct label) of the logistic model for a batch of one."""
    x, y = batch
    prob_one = torch.sigmoid(x @ params["weight"][0] + params["bias"][0])
    return (y * prob_one + (1 - y) * (1 - prob_one)).squeeze(0)


def _grads(ckpt: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    residual = torch.sigmoid(x @ ckpt["weight"][0] + ckpt["bias"][0]) - y
    return (residual[:, None] * torch.cat([x, torch.ones(len(x), 1)], dim=1)).double()


def _one_minus_p(ckpt: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    prob_one = torch.sigmoid(x @ ckpt["weight"][0] + ckpt["bias"][0]).double()
    return 1 - torch.where(y > 0.5, prob_one, 1 - prob_one)


def _kernel_product(ckpt: Dict[str, Tensor]) -> Tensor:
    """G_train (G^T G)^-1 G_test^T, (n_train, n_test)."""
    g = _grads(ckpt, *TRAIN)
    return g @ torch.linalg.solve(g.T @ g, _grads(ckpt, *TEST).T)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


TRAIN = _data(23, seed=0)
TEST = _data(9, seed=1)


def _attributor(checkpoints: List[Dict[str, Tensor]], projector_kwargs: Dict | None = None) -> TRAKAttributor:
    return TRAKAttributor(_task(checkpoints), _correct_probability, projector_kwargs=projector_kwargs)


def _cached_scores(checkpoints: List[Dict[str, Tensor]], projector_kwargs: Dict | None = None) -> Tensor:
    attributor = _attributor(checkpoints, projector_kwargs)
    attributor.cache(_loader(*TRAIN, batch_size=6))
    return attributor.attribute(_loader(*TEST, batch_size=4))


def test_single_checkpoint_equals_closed_form() -> None:
    ckpt = _checkpoint(3)
    expected = _kernel_product(ckpt) * _one_minus_p(ckpt, *TRAIN)[:, None]
    scores = _cached_scores([ckpt], IDENTITY)
    assert scores.shape == (23, 9)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_ensemble_averages_kernel_products_and_q_separately() -> None:
    ckpts = [_checkpoint(3), _checkpoint(4)]
    kernel = (_kernel_product(ckpts[0]) + _kernel_product(ckpts[1])) / 2
    q = (_one_minus_p(ckpts[0], *TRAIN) + _one_minus_p(ckpts[1], *TRAIN)) / 2
    torch.testing.assert_close(
        _cached_scores(ckpts, IDENTITY).double(), kernel * q[:, None], rtol=1e-4, atol=1e-6
    )


def test_two_identical_checkpoints_equal_one() -> None:
    ckpt = _checkpoint(3)
    torch.testing.assert_close(_cached_scores([ckpt, ckpt], IDENTITY), _cached_scores([ckpt], IDENTITY))


def test_uncached_train_loader_gives_the_cached_scores() -> None:
    ckpts = [_checkpoint(3), _checkpoint(4)]
    uncached = _attributor(ckpts, {"proj_dim": 4}).attribute(
        _loader(*TEST, batch_size=9), train_dataloader=_loader(*TRAIN, batch_size=23)
    )
    torch.testing.assert_close(uncached, _cached_scores(ckpts, {"proj_dim": 4}), rtol=1e-5, atol=1e-6)


def test_projection_seed_changes_scores_and_fixed_seed_reproduces_them() -> None:
    ckpts = [_checkpoint(3), _checkpoint(4)]
    first = _cached_scores(ckpts, {"proj_dim": 4, "proj_seed": 1})
    assert torch.equal(first, _cached_scores(ckpts, {"proj_dim": 4, "proj_seed": 1}))
    assert not torch.allclose(first, _cached_scores(ckpts, {"proj_dim": 4, "proj_seed": 2}))


def test_self_attribute_is_the_diagonal() -> None:
    attributor = _attributor([_checkpoint(3)], IDENTITY)
    attributor.cache(_loader(*TRAIN, batch_size=6))
    full = attributor.attribute(_loader(*TRAIN, batch_size=6))
    torch.testing.assert_close(attributor.self_attribute(), full.diagonal(), rtol=1e-4, atol=1e-6)


def test_train_loader_rules() -> None:
    attributor = _attributor([_checkpoint(3)], IDENTITY)
    with pytest.raises(ConfigError, match="call cache"):
        attributor.attribute(_loader(*TEST, batch_size=4))
    attributor.cache(_loader(*TRAIN, batch_size=6))
    with pytest.raises(ConfigError, match="cached"):
        attributor.attribute(_loader(*TEST, batch_size=4), _loader(*TRAIN, batch_size=6))


def test_singular_kernel_uses_the_pseudo_inverse_and_says_how_to_avoid_it() -> None:
    with pytest.warns(
        RuntimeWarning, match=r"23 training samples for 64 .*attributor\.regularization=.*proj_dim=16"
    ):
        _cached_scores([_checkpoint(3)], {"proj_dim": 64})
    x, y = TRAIN
    dead = x.clone()
    dead[:, 2] = 0.0  # this weight's gradient is zero for every sample: a null direction of the kernel
    attributor = _attributor([_checkpoint(3)], IDENTITY)
    with pytest.warns(RuntimeWarning, match="never varies"):
        attributor.cache(_loader(dead, y, batch_size=6))
    ckpt = _checkpoint(3)
    g = _grads(ckpt, dead, y)
    expected = g @ torch.linalg.pinv(g.T @ g) @ _grads(ckpt, *TEST).T * _one_minus_p(ckpt, dead, y)[:, None]
    torch.testing.assert_close(
        attributor.attribute(_loader(*TEST, batch_size=4)).double(), expected, rtol=1e-4, atol=1e-6
    )
    with warnings.catch_warnings():  # a ridge makes the same kernel invertible
        warnings.simplefilter("error")
        regularised = TRAKAttributor(_task([ckpt]), _correct_probability, IDENTITY, regularization=1e-3)
        regularised.cache(_loader(dead, y, batch_size=6))


def test_ill_conditioned_kernel_warns_and_a_healthy_one_does_not() -> None:
    x, y = TRAIN
    faint = x.clone()
    faint[:, 2] *= 1e-3  # this weight's gradient is tiny for every sample
    attributor = _attributor([_checkpoint(3)], IDENTITY)
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        attributor.cache(_loader(faint, y, batch_size=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cached_scores([_checkpoint(3)], IDENTITY)


BIG_TRAIN = _data(230, seed=2)


def _row_by_row(attributor: TRAKAttributor) -> None:
    """Gradients one sample at a time: torch's vectorised kernels may round the last bit of a
    per-sample gradient differently with the batch size, which is upstream of the projection."""
    batch_grads = attributor._grads

    def grads(params: Tensor, grad_func, batch: Tuple[Tensor, Tensor]) -> Tensor:
        rows = [batch_grads(params, grad_func, (x[None], y[None])) for x, y in zip(*batch)]
        return torch.cat(rows)

    attributor._grads = grads  # type: ignore[method-assign]


def _phi_and_scores(
    batch_size: int, stores: Dict[int, BlockStore] | None = None
) -> Tuple[List[Tensor], Tensor]:
    attributor = _attributor([_checkpoint(3), _checkpoint(4)], {"proj_dim": 5, "proj_max_batch_size": 32})
    _row_by_row(attributor)
    if stores is not None:
        attributor.feature_store = lambda kind, ckpt_idx, extra: stores[ckpt_idx]
    attributor.cache(_loader(*BIG_TRAIN, batch_size=batch_size))
    scores = attributor.attribute(_loader(*TEST, batch_size=4))
    return [f.dense() for f in attributor.train_side.features], scores


def test_projected_features_do_not_depend_on_the_train_batch_size() -> None:
    phi, scores = _phi_and_scores(32)
    for batch_size in (7, 100):
        other_phi, other_scores = _phi_and_scores(batch_size)
        assert all(torch.equal(a, b) for a, b in zip(phi, other_phi))  # bit for bit
        # the float64 kernel is summed batch by batch: the order differs, the sum agrees closely
        torch.testing.assert_close(other_scores, scores, rtol=1e-6, atol=1e-9)


def test_test_batch_size_does_not_change_a_bit() -> None:
    attributor = _attributor([_checkpoint(3)], {"proj_dim": 5, "proj_max_batch_size": 4})
    _row_by_row(attributor)
    attributor.cache(_loader(*BIG_TRAIN, batch_size=7))
    first = attributor.attribute(_loader(*TEST, batch_size=9))
    for batch_size in (1, 2, 5):
        assert torch.equal(attributor.attribute(_loader(*TEST, batch_size=batch_size)), first)


def test_stored_blocks_between_computed_ones_give_identical_bytes() -> None:
    fresh = {0: BlockStore(), 1: BlockStore()}
    phi, scores = _phi_and_scores(7, fresh)
    resumed = {k: BlockStore() for k in fresh}
    for k, store in fresh.items():
        for name in sorted(store._memory)[::3]:  # every third block survived an interrupted run
            resumed[k].put(name, store._memory[name])
    again_phi, again_scores = _phi_and_scores(7, resumed)
    assert torch.equal(again_scores, scores)
    assert all(torch.equal(a, b) for a, b in zip(phi, again_phi))
    assert (resumed[0].hits, resumed[0].misses) == (11, 22)  # 230 rows in 33 batches
