"""Code written for dattri runs unchanged: its calling conventions, its newer keyword arguments.

The user-side functions here are written the way dattri's documentation and API
reference show them: TracIn / Grad-Dot / Grad-Cos / TRAK functions take one sample
without a batch dimension (and ``unsqueeze`` it themselves), the influence-function
classes take batches. Their scores must equal those of the CLI's built-in functions
(``make_loss_funcs``) on the same digits checkpoints, and the new keyword arguments
must match their closed forms.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dattri_cli.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.data import digits
from dattri_cli.errors import ConfigError
from dattri_cli.func.utils import flatten_func
from dattri_cli.models import MLP, LogisticRegression
from dattri_cli.models.train import TrainSettings, correct_probability, make_loss_funcs, train_one
from dattri_cli.task import AttributionTask

SETTINGS = TrainSettings(epochs=3, batch_size=32)
SPLIT = digits(n_train=80, n_test=10, split_seed=0)


def _model_and_checkpoints(kind: str, count: int = 1) -> tuple[nn.Module, List[Dict[str, Tensor]]]:
    make = (
        (lambda: LogisticRegression(SPLIT.num_features, SPLIT.num_classes))
        if kind == "lr"
        else (lambda: MLP(SPLIT.num_features, SPLIT.num_classes, hidden=(16,)))
    )
    model = make()
    states = [train_one(make(), SPLIT, SETTINGS, seed=s)[-1][1] for s in range(count)]
    return model, states


def _loaders(batch: int = 16) -> tuple[DataLoader, DataLoader]:
    return SPLIT.loaders(batch, 4)


def _dattri_style_functions(model: nn.Module, weight_decay: float) -> Dict[str, Any]:
    """The functions a dattri user writes: per-sample with unsqueeze (TracIn/TRAK), batched (IF)."""

    def per_sample_loss(params: Dict[str, Tensor], image_label_pair: Any) -> Tensor:
        image, label = image_label_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        l2 = sum((p * p).sum() for p in params.values())
        return nn.CrossEntropyLoss()(yhat, label.unsqueeze(0)) + 0.5 * weight_decay * l2

    def per_sample_target(params: Dict[str, Tensor], image_label_pair: Any) -> Tensor:
        image, label = image_label_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        return nn.CrossEntropyLoss()(yhat, label.unsqueeze(0))

    def batch_loss(params: Dict[str, Tensor], data_target_pair: Any) -> Tensor:
        image, label = data_target_pair
        yhat = torch.func.functional_call(model, params, image)
        l2 = sum((p * p).sum() for p in params.values())
        return nn.CrossEntropyLoss()(yhat, label.long()) + 0.5 * weight_decay * l2

    def batch_target(params: Dict[str, Tensor], data_target_pair: Any) -> Tensor:
        image, label = data_target_pair
        yhat = torch.func.functional_call(model, params, image)
        return nn.CrossEntropyLoss()(yhat, label.long())

    # the reference's correct_probability_func example, verbatim but for the model
    @flatten_func(model)
    def m(params: Any, image_label_pair: Any) -> Tensor:
        image, label = image_label_pair
        image_t = image.unsqueeze(0)
        label_t = label.unsqueeze(0)
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, image_t)
        p = torch.exp(-loss(yhat, label_t))
        return p

    return {"sample": (per_sample_loss, per_sample_target), "batch": (batch_loss, batch_target), "p": m}


def _builtin_task(model: nn.Module, states: List[Dict[str, Tensor]]) -> AttributionTask:
    loss, target = make_loss_funcs(model, SETTINGS.weight_decay, SPLIT.x_train.dim() - 1)
    return AttributionTask(loss, model, states, target_func=target)


def _user_task(model: nn.Module, states: List[Dict[str, Tensor]], style: str) -> AttributionTask:
    loss, target = _dattri_style_functions(model, SETTINGS.weight_decay)[style]
    return AttributionTask(loss_func=loss, model=model, checkpoints=states, target_func=target)


@pytest.mark.parametrize("normalized_grad", [False, True])
def test_tracin_with_per_sample_functions_equals_builtin(normalized_grad: bool) -> None:
    model, states = _model_and_checkpoints("mlp", count=2)
    train, test = _loaders()
    weights = torch.tensor([0.5, 2.0])
    ours = TracInAttributor(_builtin_task(model, states), weights, normalized_grad).attribute(train, test)
    theirs = TracInAttributor(_user_task(model, states, "sample"), weights, normalized_grad).attribute(
        train, test
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 0


def test_trak_reference_example_runs_verbatim_and_equals_builtin() -> None:
    model, states = _model_and_checkpoints("mlp", count=2)
    train, test = _loaders()
    proj = {"proj_dim": 32}
    user = TRAKAttributor(
        _user_task(model, states, "sample"), _dattri_style_functions(model, 0)["p"], proj, regularization=1e-3
    )
    user.cache(train)
    builtin = TRAKAttributor(
        _builtin_task(model, states), correct_probability(model, 1), proj, regularization=1e-3
    )
    builtin.cache(train)
    torch.testing.assert_close(user.attribute(test), builtin.attribute(test), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: IFAttributorExplicit(t, regularization=1e-2),
        lambda t: IFAttributorCG(t, regularization=1e-2, max_iter=20),
        lambda t: IFAttributorArnoldi(t, regularization=1e-2, proj_dim=20, max_iter=30),
        lambda t: IFAttributorDataInf(t, regularization=0.1),
        lambda t: IFAttributorEKFAC(t, damping=0.1),
    ],
    ids=["explicit", "cg", "arnoldi", "datainf", "ekfac"],
)
def test_influence_with_batch_functions_equals_builtin(make: Any) -> None:
    model, states = _model_and_checkpoints("lr")
    train, test = _loaders()
    scores = []
    for task in (_builtin_task(model, states), _user_task(model, states, "batch")):
        attributor = make(task)
        attributor.cache(train)
        scores.append(attributor.attribute(train, test))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-6)
    assert scores[0].abs().max() > 0


def test_lissa_with_batch_functions_equals_builtin() -> None:
    model, states = _model_and_checkpoints("lr")
    train, test = _loaders()
    scores = []
    for task in (_builtin_task(model, states), _user_task(model, states, "batch")):
        torch.manual_seed(0)
        attributor = IFAttributorLiSSA(task, batch_size=8, recursion_depth=30, damping=0.01, scaling=20.0)
        attributor.cache(train)
        scores.append(attributor.attribute(train, test))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-6)


class _DictDigits(Dataset):
    """The digits split as ``{"input": x, "label": y}`` items (dict batches)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"input": self.x[i], "label": self.y[i]}


def test_dict_batches_reach_the_functions_as_dicts() -> None:
    model, states = _model_and_checkpoints("lr")

    def loss(params: Dict[str, Tensor], batch: Dict[str, Tensor]) -> Tensor:
        x, y = batch["input"], batch["label"]
        if x.dim() == 1:  # one sample, as TracIn calls it
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    def tuple_loss(params: Dict[str, Tensor], batch: Any) -> Tensor:
        return loss(params, {"input": batch[0], "label": batch[1]})

    dict_train = DataLoader(_DictDigits(SPLIT.x_train, SPLIT.y_train), batch_size=16)
    dict_test = DataLoader(_DictDigits(SPLIT.x_test, SPLIT.y_test), batch_size=4)
    train, test = _loaders()
    for make in (
        lambda t: TracInAttributor(t, [1.0], False),
        lambda t: IFAttributorExplicit(t, regularization=1e-2),
    ):
        from_dicts = make(AttributionTask(loss, model, states))
        from_tuples = make(AttributionTask(tuple_loss, model, states))
        if hasattr(from_dicts, "full_train_dataloader"):
            from_dicts.cache(dict_train)
            from_tuples.cache(train)
        torch.testing.assert_close(
            from_dicts.attribute(dict_train, dict_test), from_tuples.attribute(train, test)
        )


# -- AttributionTask: dattri's signatures and semantics -------------------------------------


def test_task_gradient_functions_follow_in_dims() -> None:
    model, states = _model_and_checkpoints("mlp")
    task = _user_task(model, states, "batch")
    x, y = SPLIT.x_train[:5], SPLIT.y_train[:5]
    params, _ = task.get_param(0)
    batch_of_one = task.get_grad_loss_func()(params, (x.unsqueeze(0), y.unsqueeze(0)))  # in_dims (None, 1)
    by_hand = torch.stack(
        [torch.func.grad(task.get_loss_func())(params, (x[i : i + 1], y[i : i + 1])) for i in range(5)]
    )
    torch.testing.assert_close(batch_of_one, by_hand)
    sample_task = _user_task(model, states, "sample")
    per_sample = sample_task.get_grad_loss_func(in_dims=(None, 0))(params, (x, y))
    torch.testing.assert_close(per_sample, by_hand, rtol=1e-5, atol=1e-7)


def test_task_layer_name_restricts_to_the_named_parameters() -> None:
    model, states = _model_and_checkpoints("mlp")
    task = _user_task(model, states, "batch")
    names = ["head.weight", "head.bias"]  # the last parameters, so their gradient is the tail of the full one
    x, y = SPLIT.x_train[:4].unsqueeze(0), SPLIT.y_train[:4].unsqueeze(0)
    full_params, _ = task.get_param(ckpt_idx=0)
    part_params, _ = task.get_param(ckpt_idx=0, layer_name=names)
    full = task.get_grad_loss_func()(full_params, (x, y))
    part = task.get_grad_loss_func(layer_name=names, ckpt_idx=0)(part_params, (x, y))
    torch.testing.assert_close(part, full[:, -part.shape[1] :])
    assert part.shape[1] == sum(dict(model.named_parameters())[n].numel() for n in names)


def test_task_function_getters_and_param_layer_map() -> None:
    model, states = _model_and_checkpoints("mlp")
    loss, _ = _dattri_style_functions(model, 0.0)["batch"]
    task = AttributionTask(loss_func=loss, model=model, checkpoints=states[0])
    assert task.get_loss_func(flatten=False) is loss
    assert task.get_target_func(flatten=False) is loss
    with pytest.raises(NotImplementedError):
        task.get_loss_func(flatten=False, layer_name=["head.weight"])
    params, _ = task.get_param(0)
    batch = (SPLIT.x_train[:8], SPLIT.y_train[:8])
    named = dict(model.named_parameters())
    torch.testing.assert_close(
        task.get_loss_func()(params, batch), loss({k: v.detach() for k, v in named.items()}, batch)
    )
    pieces, layer_map = task.get_param(0, layer_split=True)
    assert layer_map == [0, 0, 1, 1]  # weight and bias of each Linear share a layer
    assert [p.numel() for p in pieces] == [v.numel() for v in named.values()]
    _, explicit = task.get_param(0, layer_split=True, param_layer_map=[0, 1, 2, 3])
    assert explicit == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="param_layer_map"):
        task.get_param(0, layer_split=True, param_layer_map=[0, 1])
    assert task.get_checkpoints() == [states[0]]


# -- dattri 0.3.0's newer keyword arguments ----------------------------------------------


def _identity_trak_closed_form(model: nn.Module, state: Dict[str, Tensor], regularization: float) -> Tensor:
    """Phi (Phi^T Phi + reg I)^-1 Psi^T * (1 - p), Phi the gradients over sqrt(P), by hand."""
    task = _builtin_task(model, [state])
    params, _ = task.get_param(0)
    grads = task.get_grad_loss_func(in_dims=(None, 0))
    targets = task.get_grad_target_func(in_dims=(None, 0))
    scale = math.sqrt(params.numel())
    phi = (grads(params, (SPLIT.x_train, SPLIT.y_train)) / scale).double()
    psi = (targets(params, (SPLIT.x_test, SPLIT.y_test)) / scale).double()
    kernel = phi.T @ phi + regularization * torch.eye(phi.shape[1], dtype=torch.float64)
    named = task.named_parameters(0)
    p = correct_probability(model, 1)
    q = 1 - torch.stack([p(named, (x, y)) for x, y in zip(SPLIT.x_train, SPLIT.y_train)]).double()
    return (phi @ torch.linalg.solve(kernel, psi.T)) * q[:, None]


def test_trak_regularization_is_a_ridge_on_the_kernel() -> None:
    model, states = _model_and_checkpoints(
        "mlp"
    )  # 1210 parameters > 80 training rows: singular without a ridge
    train, test = _loaders()
    attributor = TRAKAttributor(
        _builtin_task(model, states),
        correct_probability(model, 1),
        {"proj_type": "identity"},
        regularization=0.05,
    )
    attributor.cache(train)
    expected = _identity_trak_closed_form(model, states[0], 0.05).float()
    torch.testing.assert_close(attributor.attribute(test), expected, rtol=2e-3, atol=1e-5)
    unregularised = TRAKAttributor(
        _builtin_task(model, states), correct_probability(model, 1), {"proj_type": "identity"}
    )
    with pytest.warns(
        RuntimeWarning, match=r"80 training samples .*attributor\.regularization=.*proj_dim=64"
    ):
        unregularised.cache(train)
    with pytest.raises(ConfigError, match="regularization"):
        TRAKAttributor(_builtin_task(model, states), correct_probability(model, 1), regularization=-1.0)


def test_trak_self_attribute_accepts_the_cached_loader() -> None:
    model, states = _model_and_checkpoints("lr")
    train, _ = _loaders()
    attributor = TRAKAttributor(
        _builtin_task(model, states), correct_probability(model, 1), {"proj_dim": 16}, regularization=1e-3
    )
    attributor.cache(train)
    torch.testing.assert_close(attributor.self_attribute(train), attributor.self_attribute())
    with pytest.raises(ConfigError, match="cached"):
        attributor.self_attribute(_loaders()[0])  # another loader object than the cached one


def test_datainf_fim_estimate_data_ratio_uses_the_first_batches() -> None:
    model, states = _model_and_checkpoints("lr")
    train, test = _loaders(batch=16)  # 5 batches; ratio 0.5 -> the first 3
    first_three = DataLoader(TensorDataset(SPLIT.x_train[:48], SPLIT.y_train[:48]), batch_size=16)
    partial = IFAttributorDataInf(
        _builtin_task(model, states), regularization=0.1, fim_estimate_data_ratio=0.5
    )
    partial.cache(train)
    by_hand = IFAttributorDataInf(_builtin_task(model, states), regularization=0.1)
    by_hand.cache(first_three)
    full = IFAttributorDataInf(_builtin_task(model, states), regularization=0.1)
    full.cache(train)
    torch.testing.assert_close(partial.attribute(train, test), by_hand.attribute(train, test))
    assert not torch.allclose(partial.attribute(train, test), full.attribute(train, test))
    with pytest.raises(ConfigError, match="fim_estimate_data_ratio"):
        IFAttributorDataInf(_builtin_task(model, states), regularization=0.1, fim_estimate_data_ratio=0.0)


def test_ekfac_cache_max_iter_fits_on_the_first_batches() -> None:
    model, states = _model_and_checkpoints("mlp")
    train, test = _loaders(batch=16)
    first_two = DataLoader(TensorDataset(SPLIT.x_train[:32], SPLIT.y_train[:32]), batch_size=16)
    limited = IFAttributorEKFAC(_builtin_task(model, states), damping=0.1)
    limited.cache(train, max_iter=2)
    by_hand = IFAttributorEKFAC(_builtin_task(model, states), damping=0.1)
    by_hand.cache(first_two)
    torch.testing.assert_close(limited.attribute(train, test), by_hand.attribute(train, test))


@pytest.mark.parametrize("method", ["l", "theta"])
def test_relatif_normalises_each_training_row(method: str) -> None:
    model, states = _model_and_checkpoints("lr")
    train, test = _loaders()
    task = _builtin_task(model, states)
    attributor = IFAttributorExplicit(task, regularization=1e-2)
    attributor.cache(train)
    plain = attributor.attribute(train, test)
    normalised = attributor.attribute(train, test, relatif_method=method)
    # by hand: the dense (H + reg I)^-1 applied to every training gradient
    params, _ = task.get_param(0)
    g_loss = task.get_grad_loss_func()(
        params, (SPLIT.x_train.unsqueeze(0), SPLIT.y_train.unsqueeze(0))
    ).double()
    g_target = task.get_grad_target_func()(
        params, (SPLIT.x_train.unsqueeze(0), SPLIT.y_train.unsqueeze(0))
    ).double()
    hessian = torch.func.hessian(task.get_loss_func())(params, (SPLIT.x_train, SPLIT.y_train)).double()
    solved = torch.linalg.solve(hessian + 1e-2 * torch.eye(hessian.shape[0], dtype=torch.float64), g_loss.T).T
    denom = (g_target * solved).sum(1).clamp_min(1e-12).sqrt() if method == "l" else solved.norm(dim=1)
    torch.testing.assert_close(
        normalised, (plain.double() / denom[:, None]).to(plain.dtype), rtol=1e-3, atol=1e-6
    )
    self_scores = attributor.self_attribute(train, relatif_method=method)
    torch.testing.assert_close(
        self_scores,
        (attributor.self_attribute(train).double() / denom).to(self_scores.dtype),
        rtol=1e-3,
        atol=1e-6,
    )
    with pytest.raises(ConfigError, match="relatif_method"):
        attributor.attribute(train, test, relatif_method="bogus")
