"""Grad-Dot and explicit influence against closed forms for L2-regularised logistic regression.

For softmax regression with loss ``CE + lam/2 ||theta||^2`` the per-sample gradient
is ``(p - e_y) x~^T + lam * theta`` (``x~ = [x, 1]``) and the Hessian of the mean
loss is ``mean_n (diag(p) - p p^T) (x) x~ x~^T + lam I``; both are written out
below with einsum, independently of autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.influence_function import IFAttributorExplicit
from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.task import AttributionTask

LAM = 0.05


def make_problem(dtype: torch.dtype, n_train: int = 40, n_test: int = 9, d: int = 5, c: int = 3):
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(d, c).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=gen, dtype=dtype))
        model.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
    x = torch.randn(n_train + n_test, d, generator=gen, dtype=dtype)
    y = torch.randint(0, c, (n_train + n_test,), generator=gen)

    def loss(params, batch):
        xb, yb = batch
        logits = torch.func.functional_call(model, params, (xb,))
        reg = 0.5 * LAM * sum((p * p).sum() for p in params.values())
        return nn.functional.cross_entropy(logits, yb) + reg

    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    return model, task, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def analytic_grads(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b = model.weight.detach().double(), model.bias.detach().double()
    x = x.double()
    p = torch.softmax(x @ w.T + b, dim=1)
    r = p - nn.functional.one_hot(y, w.shape[0]).double()
    gw = torch.einsum("nc,nd->ncd", r, x) + LAM * w
    gb = r + LAM * b
    return torch.cat([gw.reshape(len(x), -1), gb], dim=1)


def analytic_hessian(model: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, b = model.weight.detach().double(), model.bias.detach().double()
    x = x.double()
    n, d = x.shape
    c = w.shape[0]
    p = torch.softmax(x @ w.T + b, dim=1)
    s = torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)
    hww = torch.einsum("nck,nj,nl->cjkl", s, x, x).reshape(c * d, c * d) / n
    hwb = torch.einsum("nck,nj->cjk", s, x).reshape(c * d, c) / n
    hbb = s.mean(0)
    top = torch.cat([hww, hwb], dim=1)
    bottom = torch.cat([hwb.T, hbb], dim=1)
    return torch.cat([top, bottom]) + LAM * torch.eye(c * d + c, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def loaders(train, test, bs_train=7, bs_test=4):
    return DataLoader(TensorDataset(*train), batch_size=bs_train), DataLoader(
        TensorDataset(*test), batch_size=bs_test
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_dot_equals_analytic_gradient_products(dtype):
    model, task, train, test = make_problem(dtype)
    train_dl, test_dl = loaders(train, test)
    scores = TracInAttributor(task, weight_list=[1.0], normalized_grad=False).attribute(train_dl, test_dl)
    expected = analytic_grads(model, *train) @ analytic_grads(model, *test).T
    assert scores.shape == (40, 9)
    assert scores.dtype == dtype
    assert rel_err(scores, expected) < 1e-5


def test_grad_cos_equals_cosine_similarity():
    model, task, train, test = make_problem(torch.float64)
    train_dl, test_dl = loaders(train, test)
    scores = TracInAttributor(task, weight_list=[1.0], normalized_grad=True).attribute(train_dl, test_dl)
    g_tr = nn.functional.normalize(analytic_grads(model, *train), dim=1)
    g_te = nn.functional.normalize(analytic_grads(model, *test), dim=1)
    assert rel_err(scores, g_tr @ g_te.T) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("regularization", [0.0, 0.1])
def test_explicit_influence_equals_closed_form(dtype, regularization):
    model, task, train, test = make_problem(dtype)
    train_dl, test_dl = loaders(train, test)
    attributor = IFAttributorExplicit(task, regularization=regularization)
    attributor.cache(train_dl)
    scores = attributor.attribute(train_dl, test_dl)
    h = analytic_hessian(model, train[0]) + regularization * torch.eye(18, dtype=torch.float64)
    g_tr, g_te = analytic_grads(model, *train), analytic_grads(model, *test)
    expected = g_tr @ torch.linalg.solve(h, g_te.T)
    assert rel_err(scores, expected) < 1e-5


def test_explicit_influence_is_independent_of_cache_batch_size():
    _, task, train, test = make_problem(torch.float64)
    results = []
    for bs in (1, 7, 40):
        train_dl, test_dl = loaders(train, test, bs_train=bs)
        attributor = IFAttributorExplicit(task)
        attributor.cache(train_dl)
        results.append(attributor.attribute(train_dl, test_dl))
    assert rel_err(results[0], results[2]) < 1e-10
    assert rel_err(results[1], results[2]) < 1e-10


def test_layer_name_restricts_to_named_parameters():
    model, task, train, test = make_problem(torch.float64)
    train_dl, test_dl = loaders(train, test)
    scores = TracInAttributor(task, [1.0], False, layer_name="bias").attribute(train_dl, test_dl)
    g_tr, g_te = analytic_grads(model, *train)[:, -3:], analytic_grads(model, *test)[:, -3:]
    assert rel_err(scores, g_tr @ g_te.T) < 1e-10


def test_ensemble_of_identical_checkpoints_equals_one():
    model, task, train, test = make_problem(torch.float64)
    train_dl, test_dl = loaders(train, test)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twice = AttributionTask(task.original_loss_func, model, [state, state])
    one = IFAttributorExplicit(task, regularization=0.1)
    two = IFAttributorExplicit(twice, regularization=0.1)
    one.cache(train_dl)
    two.cache(train_dl)
    assert rel_err(two.attribute(train_dl, test_dl), one.attribute(train_dl, test_dl)) < 1e-12
