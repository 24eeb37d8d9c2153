"""Influence-function attributors against exact influence on softmax regression with L2.

The reference ``G_train (H + reg I)^-1 G_test^T`` is built from hand-written softmax
formulas (gradients and Hessian), independent of the autograd code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy, one_hot
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.influence_function import (
    IFAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.func.utils import flatten_func
from dattri_cli.task import AttributionTask

N_TRAIN, N_TEST, D, C, LAM = 24, 5, 4, 3, 0.05
P = D * C + C


def make_model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def make_data() -> tuple:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N_TRAIN + N_TEST,), generator=gen)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


TRAIN, TEST = make_data()


def loader(ds: TensorDataset, size: int) -> DataLoader:
    return DataLoader(ds, batch_size=size, shuffle=False)


def make_task(model: nn.Module, checkpoints: object = None, lam: float = LAM) -> AttributionTask:
    def loss_func(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        l2 = sum((p * p).sum() for p in params.values())
        return cross_entropy(functional_call(model, params, (x,)), y) + 0.5 * lam * l2

    ckpt = checkpoints if checkpoints is not None else {k: v.clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss_func, model, ckpt)


def flat_params(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def analytic(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Per-sample gradients ``(n, P)`` and the mean Hessian ``(P, P)`` by hand."""
    w = flat_params(model)
    prob = torch.softmax(x @ model.weight.detach().T + model.bias.detach(), dim=1)
    jac = torch.zeros(x.shape[0], C, P, dtype=x.dtype)
    for c in range(C):
        jac[:, c, c * D : (c + 1) * D] = x
        jac[:, c, D * C + c] = 1.0
    grads = torch.einsum("ncp,nc->np", jac, prob - one_hot(y, C).double()) + LAM * w
    curv = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    hess = torch.einsum("ncp,ncd,ndq->pq", jac, curv, jac) / x.shape[0] + LAM * torch.eye(P, dtype=x.dtype)
    return grads, hess


def exact_scores(model: nn.Linear, reg: float = 0.0) -> torch.Tensor:
    g_train, hess = analytic(model, *TRAIN.tensors)
    g_test, _ = analytic(model, *TEST.tensors)
    return g_train @ torch.linalg.solve(hess + reg * torch.eye(P, dtype=hess.dtype), g_test.T)


def run(attributor: object, cache_size: int = N_TRAIN) -> torch.Tensor:
    attributor.cache(loader(TRAIN, cache_size))
    return attributor.attribute(loader(TRAIN, 5), loader(TEST, 2)).double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model() -> nn.Linear:
    return make_model()


@pytest.fixture(scope="module")
def exact(model: nn.Linear) -> torch.Tensor:
    return exact_scores(model)


def test_explicit_matches_exact_influence(model: nn.Linear, exact: torch.Tensor) -> None:
    scores = run(IFAttributorExplicit(make_task(model)))
    assert scores.shape == (N_TRAIN, N_TEST)
    assert rel_err(scores, exact) < 1e-5


def test_explicit_regularization_is_added_to_the_hessian(model: nn.Linear) -> None:
    scores = run(IFAttributorExplicit(make_task(model), regularization=0.2))
    assert rel_err(scores, exact_scores(model, reg=0.2)) < 1e-5


def test_cg_with_enough_iterations_matches_exact(model: nn.Linear, exact: torch.Tensor) -> None:
    attributor = IFAttributorCG(make_task(model), max_iter=3 * P, tol=1e-10)
    scores = run(attributor, cache_size=7)
    assert rel_err(scores, exact) < 1e-4
    diag = attributor.diagnostics["checkpoint_0"]
    assert diag["tol_reached"] and diag["residual_norms"][-1] <= 1e-10


def test_cg_few_iterations_reports_tol_not_reached(model: nn.Linear) -> None:
    attributor = IFAttributorCG(make_task(model), max_iter=2)
    run(attributor)
    diag = attributor.diagnostics["checkpoint_0"]
    assert not diag["tol_reached"] and diag["iterations"] == 2 and len(diag["residual_norms"]) == 3


def test_cg_rev_fwd_equals_rev_rev(model: nn.Linear) -> None:
    rev = run(IFAttributorCG(make_task(model), max_iter=5, mode="rev-rev"))
    fwd = run(IFAttributorCG(make_task(model), max_iter=5, mode="rev-fwd"))
    assert rel_err(fwd, rev) < 1e-10


def test_arnoldi_full_dimension_matches_exact(model: nn.Linear, exact: torch.Tensor) -> None:
    attributor = IFAttributorArnoldi(make_task(model), proj_dim=P, max_iter=P)
    scores = run(attributor, cache_size=5)
    assert rel_err(scores, exact) < 1e-4
    assert attributor.diagnostics["checkpoint_0"]["kept_eigenvalues"] == P


def test_arnoldi_before_cache_raises_value_error(model: nn.Linear) -> None:
    attributor = IFAttributorArnoldi(make_task(model), proj_dim=3)
    with pytest.raises(ValueError, match="cache"):
        attributor.attribute(loader(TRAIN, 5), loader(TEST, 2))
    with pytest.raises(ValueError, match="cache"):
        attributor.transform_test_rep(0, torch.zeros(1, P, dtype=torch.float64))


def test_lissa_is_close_with_the_right_sign_and_scale(model: nn.Linear, exact: torch.Tensor) -> None:
    torch.manual_seed(0)
    attributor = IFAttributorLiSSA(
        make_task(model), batch_size=12, recursion_depth=200, num_repeat=2, scaling=1.5
    )
    scores = run(attributor)
    assert rel_err(scores, exact) < 0.25  # a flipped sign gives 2, a missed 1/scaling 0.5
    fitted_scale = float((scores * exact).sum() / (exact * exact).sum())
    assert 0.85 < fitted_scale < 1.15
    assert attributor.diagnostics["checkpoint_0"]["relative_residual"] < 0.5


def test_lissa_damping_times_scaling_is_the_regularization(model: nn.Linear) -> None:
    attributor = IFAttributorLiSSA(
        make_task(model), batch_size=N_TRAIN, recursion_depth=150, damping=0.1, scaling=1.0
    )
    assert rel_err(run(attributor), exact_scores(model, reg=0.1)) < 1e-4


def test_lissa_divergence_names_scaling_and_damping(model: nn.Linear) -> None:
    attributor = IFAttributorLiSSA(make_task(model), batch_size=N_TRAIN, recursion_depth=300, scaling=0.01)
    with pytest.raises(NumericalError, match="scaling.*damping"):
        run(attributor)


def test_lissa_collate_fn_splits_params_from_data() -> None:
    params, x, y = torch.zeros(3), torch.ones(2, 4), torch.tensor([0, 1])
    out_params, batch = IFAttributorLiSSA.lissa_collate_fn([params, x, y])
    assert out_params is params and len(batch) == 2 and batch[1].dtype == torch.int64


@pytest.mark.parametrize(
    "make",
    [
        lambda t: IFAttributorExplicit(t),
        lambda t: IFAttributorCG(t, max_iter=3 * P, tol=1e-12),
        lambda t: IFAttributorArnoldi(t, proj_dim=P, max_iter=P),
        lambda t: IFAttributorDataInf(t, regularization=0.1),
    ],
)
def test_cache_batch_size_does_not_change_scores(model: nn.Linear, make: object) -> None:
    one = run(make(make_task(model)), cache_size=1)
    whole = run(make(make_task(model)), cache_size=N_TRAIN)
    assert rel_err(one, whole) < 1e-6


def test_singular_hessian_without_regularization_names_the_fix() -> None:
    model = make_model()
    task = make_task(model, lam=0.0)  # softmax is shift invariant: the Hessian is singular
    with pytest.raises(NumericalError, match="regularization"):
        run(IFAttributorExplicit(task))
    assert torch.isfinite(run(IFAttributorExplicit(task, regularization=0.1))).all()


def test_ensemble_averages_checkpoints() -> None:
    first, second = make_model(0), make_model(1)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (first, second)]
    scores = run(IFAttributorExplicit(make_task(make_model(5), checkpoints=states)))
    assert rel_err(scores, (exact_scores(first) + exact_scores(second)) / 2) < 1e-5


def test_layer_name_restricts_the_hessian(model: nn.Linear) -> None:
    g_train, hess = analytic(model, *TRAIN.tensors)
    g_test, _ = analytic(model, *TEST.tensors)
    w = slice(0, D * C)
    expected = g_train[:, w] @ torch.linalg.solve(hess[w, w], g_test[:, w].T)
    scores = run(IFAttributorExplicit(make_task(model), layer_name="weight"))
    assert rel_err(scores, expected) < 1e-5


# -- DataInf ---------------------------------------------------------------------


def naive_datainf(model: nn.Module, task: AttributionTask, reg: float) -> torch.Tensor:
    """Per-sample gradients by plain autograd, then dense per-sample inverses per layer."""

    def grads(ds: TensorDataset) -> torch.Tensor:
        rows = []
        params = dict(model.named_parameters())
        for x, y in zip(*ds.tensors):
            loss = task.original_loss_func(params, (x[None], y[None]))
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
        return torch.stack(rows)

    g_train, g_test = grads(TRAIN), grads(TEST)
    sizes = [model[0].weight.numel() + model[0].bias.numel(), model[2].weight.numel() + model[2].bias.numel()]
    blocks, start = [], 0
    for size in sizes:
        layer = slice(start, start + size)
        eye = reg * torch.eye(size, dtype=torch.float64)
        inv = sum(torch.linalg.inv(torch.outer(g[layer], g[layer]) + eye) for g in g_train) / N_TRAIN
        blocks.append(g_train[:, layer] @ inv @ g_test[:, layer].T)
        start += size
    return sum(blocks)


def test_datainf_equals_naive_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 3), nn.Tanh(), nn.Linear(3, C)).double()
    task = make_task(model)
    scores = run(IFAttributorDataInf(task, regularization=0.05), cache_size=7)
    assert rel_err(scores, naive_datainf(model, task, 0.05)) < 1e-5


def test_datainf_zero_regularization_is_refused(model: nn.Linear) -> None:
    with pytest.raises(ConfigError, match="regularization"):
        IFAttributorDataInf(make_task(model))


# -- function-style API ------------------------------------------------------------


def function_style(model: nn.Linear, solver: str, kwargs: dict) -> IFAttributor:
    @flatten_func(model)
    def target(params: dict, dataloader: list) -> torch.Tensor:
        total = 0.0
        for x, y in dataloader:
            l2 = sum((p * p).sum() for p in params.values())
            total = total + cross_entropy(functional_call(model, params, (x,)), y) + 0.5 * LAM * l2
        return total

    return IFAttributor(target, dict(model.named_parameters()), ihvp_solver=solver, ihvp_kwargs=kwargs)


@pytest.mark.parametrize(
    ("solver", "kwargs", "make"),
    [
        ("explicit", {"regularization": 0.1}, lambda t: IFAttributorExplicit(t, regularization=0.1)),
        ("cg", {"max_iter": 4}, lambda t: IFAttributorCG(t, max_iter=4)),
        ("arnoldi", {"proj_dim": 5, "max_iter": P}, lambda t: IFAttributorArnoldi(t, proj_dim=5, max_iter=P)),
        (
            "lissa",
            {"batch_size": N_TRAIN, "recursion_depth": 50, "scaling": 5.0},
            lambda t: IFAttributorLiSSA(t, batch_size=N_TRAIN, recursion_depth=50, scaling=5.0),
        ),
    ],
)
def test_function_style_equals_task_based(model: nn.Linear, solver: str, kwargs: dict, make: object) -> None:
    functional = run(function_style(model, solver, kwargs), cache_size=6)
    task_based = run(make(make_task(model)), cache_size=6)
    assert rel_err(functional, task_based) < 1e-6


def test_function_style_rejects_unknown_solver_and_kwargs(model: nn.Linear) -> None:
    with pytest.raises(ConfigError, match="ihvp_solver"):
        function_style(model, "newton", {})
    with pytest.raises(ConfigError, match="recursion_depth"):
        function_style(model, "cg", {"recursion_depth": 3})


# -- configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["if_explicit", "if_cg", "if_lissa", "if_arnoldi", "if_datainf"])
def test_config_builds_its_attributor(model: nn.Linear, name: str) -> None:
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "configs" / "attributor" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    assert "task" not in cfg and "device" not in cfg
    attributor = instantiate(cfg)(task=make_task(model), device="cpu")
    assert type(attributor).__name__ == cfg._target_.rsplit(".", 1)[1]
