"""RPS: the representer theorem on the fine-tuned final layer."""

from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli import builders, pipeline, schema, tasks
from dattri_cli.algorithm.rps import FinalLayerObjective, RPSAttributor, soft_targets
from dattri_cli.errors import ConfigError
from dattri_cli.models.train import TrainSettings
from dattri_cli.task import AttributionTask

IN, HIDDEN = 4, 6


class TinyNet(nn.Module):
    """Two layers; ``head`` is the final linear layer."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(IN, HIDDEN)
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


def _checkpoint(classes: int, seed: int) -> Dict[str, Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in TinyNet(classes).state_dict().items()}


def _task(classes: int, checkpoints: List[Dict[str, Tensor]]) -> AttributionTask:
    def loss_func(params: Dict[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
        raise AssertionError("RPS builds its own cross-entropy")

    return AttributionTask(loss_func=loss_func, model=TinyNet(classes), checkpoints=checkpoints)


def _data(n: int, classes: int, seed: int) -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen)
    return x, torch.randint(0, max(classes, 2), (n,), generator=gen)


def _loader(data: Tuple[Tensor, Tensor], batch_size: int = 7) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)


def _fitted(
    classes: int, checkpoints: List[Dict[str, Tensor]], train: Tuple[Tensor, Tensor], **kwargs: object
) -> RPSAttributor:
    attributor = RPSAttributor(_task(classes, checkpoints), "head", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge without warnings
        attributor.cache(_loader(train))
    return attributor


@pytest.mark.parametrize("classes", [3, 1])
@pytest.mark.parametrize("l2_strength", [0.003, 0.1])
def test_representer_values_reproduce_finetuned_logits(classes: int, l2_strength: float) -> None:
    train = _data(30, classes, seed=0)
    attributor = _fitted(classes, [_checkpoint(classes, 1)], train, l2_strength=l2_strength)
    scores = attributor.attribute(_loader(train), _loader(train))  # train points as test points
    theta = attributor.finetuned_theta[0]
    features = attributor._layer_io(0, _loader(train)).features
    logits = features @ theta.T  # fine-tuned pre-softmax outputs (no bias)
    picked = logits[:, 0] if classes == 1 else logits[torch.arange(30), train[1]]
    # dattri's scale: sum_i score(i, j) = logit_j / n.
    torch.testing.assert_close(scores.double().sum(dim=0) * 30, picked, rtol=1e-4, atol=1e-5)


def test_finetuned_layer_is_the_regularised_optimum() -> None:
    train = _data(30, 3, seed=0)
    attributor = _fitted(3, [_checkpoint(3, 1)], train)
    io = attributor._layer_io(0, _loader(train))
    theta = attributor.finetuned_theta[0].clone().requires_grad_(True)
    targets = torch.softmax(io.logits, dim=1)
    loss = (
        -(targets * torch.log_softmax(io.features @ theta.T, dim=1)).sum(1).mean()
        + 0.003 * theta.square().sum()
    )
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.abs().max() < 1e-7


def test_scores_follow_the_test_label_and_normalisation() -> None:
    train, test = _data(30, 3, seed=0), _data(5, 3, seed=2)
    attributor = _fitted(3, [_checkpoint(3, 1)], train)
    scores = attributor.attribute(_loader(train), _loader(test))
    io_train = attributor._layer_io(0, _loader(train))
    io_test = attributor._layer_io(0, _loader(test))
    alpha = attributor.representer_weights(0, io_train)
    expected = (io_train.features @ io_test.features.T) * alpha[:, test[1]]
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-8)
    cos = _fitted(3, [_checkpoint(3, 1)], train, normalize_preactivate=True)
    scores_cos = cos.attribute(_loader(train), _loader(test))
    unit = nn.functional.normalize
    torch.testing.assert_close(
        scores_cos.double(),
        (unit(io_train.features) @ unit(io_test.features).T) * alpha[:, test[1]],
        rtol=1e-5,
        atol=1e-8,
    )


def test_two_identical_checkpoints_equal_one_and_runs_are_deterministic() -> None:
    train, test = _data(30, 3, seed=0), _data(5, 3, seed=2)
    ckpt = _checkpoint(3, 1)
    one = _fitted(3, [ckpt], train).attribute(_loader(train), _loader(test))
    two = _fitted(3, [ckpt, ckpt], train).attribute(_loader(train), _loader(test))
    torch.testing.assert_close(two, one)
    assert torch.equal(one, _fitted(3, [ckpt], train).attribute(_loader(train), _loader(test)))


def test_unconverged_finetuning_warns() -> None:
    train = _data(30, 3, seed=0)
    attributor = RPSAttributor(_task(3, [_checkpoint(3, 1)]), "head", epoch=1)
    with pytest.warns(RuntimeWarning, match="increase `epoch`"):
        attributor.cache(_loader(train))


def test_bad_layer_name_is_a_config_error() -> None:
    train = _data(10, 3, seed=0)
    with pytest.raises(ConfigError, match="not a submodule"):
        RPSAttributor(_task(3, [_checkpoint(3, 1)]), "nope").cache(_loader(train))


@pytest.mark.parametrize("classes", [3, 1])
def test_analytic_objective_derivatives_match_autograd(classes: int) -> None:
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    targets = soft_targets(torch.randn(20, classes, generator=gen, dtype=torch.float64))
    theta = torch.randn(classes, 4, generator=gen, dtype=torch.float64)
    direction = torch.randn(classes, 4, generator=gen, dtype=torch.float64)
    objective = FinalLayerObjective(features, targets, 0.05)

    def loss(t: torch.Tensor) -> torch.Tensor:  # written out independently of the module
        logits = features @ t.T
        if classes == 1:
            ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        else:
            ce = -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
        return ce + 0.05 * t.square().sum()

    grad, probs = objective.gradient(theta)
    torch.testing.assert_close(grad, torch.func.grad(loss)(theta))
    torch.testing.assert_close(objective.loss(theta), float(loss(theta)))
    _, hvp = torch.func.jvp(torch.func.grad(loss), (theta,), (direction,))
    torch.testing.assert_close(objective.hvp(probs, direction), hvp)


def test_squared_error_scores_are_the_representers_of_the_ridge_fit() -> None:
    """One regression output: the fit is ridge regression on the model's own outputs (written here)."""
    train, test = _data(30, 1, seed=0), _data(5, 1, seed=2)
    lam = 0.01
    attributor = _fitted(1, [_checkpoint(1, 1)], train, l2_strength=lam, final_layer_loss="squared_error")
    scores = attributor.attribute(_loader(train), _loader(test)).double()
    io_train = attributor._layer_io(0, _loader(train))
    x, outputs = io_train.features, io_train.logits  # outputs include the bias: the model's predictions
    n = x.shape[0]
    ridge = torch.linalg.solve(x.T @ x + n * lam * torch.eye(HIDDEN, dtype=torch.float64), x.T @ outputs).T
    torch.testing.assert_close(attributor.finetuned_theta[0], ridge, rtol=1e-8, atol=1e-10)
    x_test = attributor._layer_io(0, _loader(test)).features
    alpha = -2.0 * (x @ ridge.T - outputs) / (2.0 * lam * n) / n  # dattri's scale: a_i / n
    torch.testing.assert_close(scores, (x @ x_test.T) * alpha, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scores.sum(0) * n, (x_test @ ridge.T)[:, 0], rtol=1e-5, atol=1e-7)
    # cross-entropy (a sigmoid for one output) on the same layer gives other scores
    ce = _fitted(1, [_checkpoint(1, 1)], train, l2_strength=lam).attribute(_loader(train), _loader(test))
    assert not torch.allclose(ce.double(), scores, rtol=1e-3)


def test_squared_error_with_several_outputs_and_other_losses_are_refused() -> None:
    train = _data(10, 3, seed=0)
    wide = RPSAttributor(_task(3, [_checkpoint(3, 1)]), "head", final_layer_loss="squared_error")
    with pytest.raises(
        ConfigError, match="needs one output per sample, but final_linear_layer_name 'head' has 3"
    ):
        wide.cache(_loader(train))
    with pytest.raises(
        ConfigError, match=r"only for final_layer_loss='cross_entropy' \(task=classification\)"
    ):
        RPSAttributor(_task(3, [_checkpoint(3, 1)]), "head", final_layer_loss="task=causal_lm")


def test_cli_passes_the_tasks_loss(small_run, tmp_path) -> None:
    """task=regression reaches RPS as squared error: scores equal the ridge representers written here."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, generator=gen)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=gen)
    np.savez(tmp_path / "reg.npz", x=x.numpy(), y=y.numpy())
    data = [f"dataset.path={tmp_path / 'reg.npz'}", "dataset.n_train=30", "dataset.n_test=6"]
    cfg = small_run(
        "dataset=file", *data, "task=regression", "model=lr", "attributor=rps", "attributor.l2_strength=0.01"
    )
    result = pipeline.run(cfg)
    resolved = schema.validate_run(builders.to_dict(cfg))
    split = builders.build_split(resolved)
    model = builders.model_factory(resolved, split, "cpu")()
    settings = TrainSettings(**resolved["train"])
    (ckpt,) = builders.acquire_checkpoints(
        resolved,
        lambda: model,
        split,
        settings,
        0,
        make_objective=builders.training_objective(resolved, split),
    )
    model.load_state_dict(load_file(str(ckpt.path)))
    x_train, x_test = (t.double() for t in (split.x_train, split.x_test))
    with torch.no_grad():
        outputs = model(split.x_train).double()  # (n, 1): the targets of the fit
    n, lam = x_train.shape[0], 0.01
    ridge = torch.linalg.solve(
        x_train.T @ x_train + n * lam * torch.eye(3, dtype=torch.float64), x_train.T @ outputs
    ).T
    alpha = -2.0 * (x_train @ ridge.T - outputs) / (2.0 * lam * n) / n
    torch.testing.assert_close(result.scores.double(), (x_train @ x_test.T) * alpha, rtol=1e-4, atol=1e-8)
    assert result.metadata["loss"]["task"] == "regression"
    # a task without a closed-form final-layer loss is refused by name, in one line
    task = AttributionTask(loss_func=lambda p, _b: p, model=model, checkpoints=[model.state_dict()])
    other = tasks.TaskFunctions("causal_lm", None, None, None, 0.0)
    attributor_cfg, run_opts = builders.split_runner(resolved["attributor"])
    with pytest.raises(ConfigError, match=r"got 'task=causal_lm'; use attributor=grad_dot") as info:
        builders.build_attributor(attributor_cfg, run_opts, task, [ckpt], split, "cpu", other)
    assert "\n" not in str(info.value)
