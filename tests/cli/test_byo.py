"""Bring your own model, data, loss and checkpoints through the run's task path (issue 16's acceptance).

Each check compares with an independent computation: per-sample gradients with a
hand-written per-sample loss differentiated by autograd one sample at a time, the
training-loss Hessian with the closed form of softmax regression, wrapped checkpoints
with the plain state dict's scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dattri_cli import builders, pipeline, schema
from dattri_cli.data import protocol
from dattri_cli.models.train import TrainSettings


class TinyLM(nn.Module):
    """Embedding -> tanh -> vocabulary logits; records the dtype its token ids arrive with."""

    seen_dtypes: List[torch.dtype] = []

    def __init__(self, vocab: int = 11, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Any = None) -> Tensor:  # noqa: ARG002
        TinyLM.seen_dtypes.append(input_ids.dtype)
        return self.out(torch.tanh(self.embed(input_ids)))


class KwargsNet(nn.Module):
    """A factory-style model taking everything as ``**kwargs`` (records what it got)."""

    received: List[dict] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        KwargsNet.received.append(dict(kwargs))
        self.linear = nn.Linear(kwargs["in_features"], kwargs["num_classes"])

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _objects(cfg):
    """Split, model and task functions as ``pipeline.run`` builds them."""
    resolved = schema.validate_run(builders.to_dict(cfg))
    split = builders.build_split(resolved)
    model = builders.model_factory(resolved, split, "cpu")()
    settings = TrainSettings(**resolved["train"])
    return resolved, split, model, settings


def _per_sample_grads(task, batch):
    """Per-sample gradients of the test target the way the attributors take them (one sample, no batch dim)."""
    grad = task.get_grad_target_func(in_dims=(None, 0))
    return grad(task.get_param(0)[0], batch)


def _flat_grad(model: nn.Module, value: Tensor) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


def _lm_data(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 11, (24, 6), generator=gen)
    mask = torch.ones(24, 6, dtype=torch.long)
    for row in range(24):  # right padding of varying length
        keep = 3 + row % 4
        ids[row, keep:] = 0
        mask[row, keep:] = 0
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=ids.numpy(), attention_mask=mask.numpy())
    return path


def test_causal_lm_gradients_equal_a_hand_written_per_sample_loss(small_run, tmp_path):
    path = _lm_data(tmp_path)
    cfg = small_run(
        "dataset=file",
        f"dataset.path={path}",
        "dataset.n_train=16",
        "dataset.n_test=8",
        "task=causal_lm",
        "model=custom",
        "model._target_=tests.cli.test_byo.TinyLM",
    )
    resolved, split, model, settings = _objects(cfg)
    assert isinstance(split, protocol.DatasetSplit)
    checkpoint = tmp_path / "lm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    resolved["checkpoint"] = str(checkpoint)
    functions, record = builders.task_functions(resolved, model, split, settings)
    assert record["weight_decay"] == 0.0  # your checkpoint: the plain loss
    task = builders.build_task(
        model, builders.user_checkpoints(str(checkpoint), 0.1), settings, split, functions
    )
    batch = next(iter(split.loaders(8, 8)[1]))
    TinyLM.seen_dtypes.clear()
    got = _per_sample_grads(task, batch)
    assert set(TinyLM.seen_dtypes) == {torch.int64}  # token ids reach the embedding as integers
    for i in range(batch["input_ids"].shape[0]):
        ids, mask = batch["input_ids"][i], batch["attention_mask"][i]
        logits = model(ids[None])[0]
        keep = mask[1:] == 1
        loss = nn.functional.cross_entropy(logits[:-1][keep], ids[1:][keep])
        torch.testing.assert_close(got[i], _flat_grad(model, loss), rtol=1e-5, atol=1e-6)


def test_regression_gradients_equal_a_hand_written_per_sample_loss(small_run, tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=gen)
    y = torch.stack([x[:, 0] * 2.99, x[:, 1] - x[:, 2]], dim=1) + 0.5  # (N, 2) float targets
    np.savez(tmp_path / "reg.npz", x=x.numpy(), y=y.numpy())
    cfg = small_run(
        "dataset=file",
        f"dataset.path={tmp_path / 'reg.npz'}",
        "dataset.n_train=20",
        "dataset.n_test=6",
        "task=regression",
        "model=mlp",
        "model.hidden=[4]",
    )
    resolved, split, model, settings = _objects(cfg)
    assert split.y_train.dtype == torch.float32 and split.y_train.shape == (20, 2)  # kept, not truncated
    torch.testing.assert_close(split.y_train, y[split.train_indices])  # rows follow the permutation
    assert model.head.out_features == 2  # the output width comes from the targets
    functions, record = builders.task_functions(resolved, model, split, settings)
    assert record["weight_decay"] == settings.weight_decay  # dattri trains this model: its L2 term
    ckpts = builders.acquire_checkpoints(
        resolved,
        lambda: model,
        split,
        settings,
        0,
        make_objective=builders.training_objective(resolved, split),
    )
    task = builders.build_task(model, ckpts, settings, split, functions)
    xb, yb = next(iter(split.loaders(6, 6)[1]))
    got = _per_sample_grads(task, (xb, yb))
    for i in range(6):
        loss = ((model(xb[i : i + 1])[0] - yb[i]) ** 2).mean()
        torch.testing.assert_close(got[i], _flat_grad(model, loss), rtol=1e-5, atol=1e-6)


def _softmax_regression_hessian(model: nn.Linear, x: Tensor) -> Tensor:
    """Closed form: mean over samples of J_i^T (diag(p_i) - p_i p_i^T) J_i, parameters (weight rows, bias)."""
    classes, features = model.weight.shape
    total = torch.zeros(classes * (features + 1), classes * (features + 1), dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).double()
    eye = torch.eye(classes, dtype=torch.float64)
    for xi, p in zip(x.double(), probs):
        jac = torch.cat([torch.kron(eye, xi[None]), eye], dim=1)  # d logits / d (W flat, b)
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total / x.shape[0]


@pytest.mark.parametrize("explicit", [None, 0.25])
def test_user_checkpoint_hessian_is_the_plain_loss_unless_weight_decay_is_set(small_run, tmp_path, explicit):
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(5, 3)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3, generator=gen)
    path = tmp_path / "user.safetensors"
    save_file({f"linear.{k}": v.contiguous() for k, v in linear.state_dict().items()}, str(path))
    overrides = [
        f"checkpoint={path}",
        "dataset=synthetic",
        "dataset.n_samples=100",
        "dataset.n_features=5",
        "dataset.n_classes=3",
        "dataset.n_train=40",
    ]
    if explicit is not None:
        overrides.append(f"task.weight_decay={explicit}")
    resolved, split, model, settings = _objects(small_run(*overrides))
    functions, record = builders.task_functions(resolved, model, split, settings)
    task = builders.build_task(model, builders.user_checkpoints(str(path), 0.1), settings, split, functions)
    flat = task.get_param(0)[0]
    loss = task.get_loss_func()
    batch = (split.x_train, split.y_train)
    hessian = torch.func.hessian(lambda p: loss(p, batch))(flat).double()
    expected = _softmax_regression_hessian(linear, split.x_train)
    wd = 0.0 if explicit is None else explicit
    assert record["weight_decay"] == wd and settings.weight_decay > 0  # train.weight_decay is NOT used
    torch.testing.assert_close(
        hessian, expected + wd * torch.eye(expected.shape[0], dtype=torch.float64), atol=2e-6, rtol=1e-4
    )


def test_weight_decay_source_is_recorded_in_the_score_file(small_run, tmp_path):
    explicit = ("attributor=if_explicit", "attributor.regularization=0.01")
    trained = pipeline.run(small_run(*explicit, out="trained.safetensors"))
    assert trained.metadata["loss"] == {
        "task": "classification",
        "weight_decay": 1e-3,
        "weight_decay_source": "train.weight_decay (checkpoints trained by dattri)",
    }
    from dattri_cli.hashing import file_sha256

    sha = trained.metadata["checkpoints"][0]["sha256"]
    path = next(p for p in Path(small_run().cache_dir).rglob("*.safetensors") if file_sha256(p) == sha)
    mine = pipeline.run(small_run(*explicit, f"checkpoint={path}", out="mine.safetensors"))
    assert mine.metadata["loss"]["weight_decay"] == 0.0
    assert mine.metadata["loss"]["weight_decay_source"].startswith("none: your own checkpoint")
    # same weights, other Hessian: without the L2 term the influence scores change
    assert not torch.equal(trained.scores, mine.scores)


def test_lightning_and_ddp_checkpoints_give_the_plain_state_dict_scores(small_run, tmp_path):
    linear = nn.Linear(64, 10)
    plain = {f"linear.{k}": v.detach().clone() for k, v in linear.state_dict().items()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    lightning = {"state_dict": {f"net.{k}": v for k, v in plain.items()}, "epoch": 3, "global_step": 30}
    lightning["state_dict"]["loss_fn.weight"] = torch.ones(10)  # another attribute of the Lightning module
    torch.save(lightning, tmp_path / "model.ckpt")
    torch.save({f"module.{k}": v for k, v in plain.items()}, tmp_path / "ddp.pt")
    runs = {}
    for name, extra in (
        ("plain.safetensors", []),
        ("model.ckpt", []),
        ("model.ckpt", ["checkpoint_prefix=net."]),
        ("ddp.pt", []),
    ):
        cfg = small_run(
            "attributor=if_explicit",
            "attributor.regularization=0.01",
            f"checkpoint={tmp_path / name}",
            *extra,
            out=f"{len(runs)}.st",
        )
        runs[(name, *extra)] = pipeline.run(cfg).scores
    reference = runs[("plain.safetensors",)]
    assert bool(torch.isfinite(reference).all())
    for key, scores in runs.items():
        assert torch.equal(scores, reference), key


def test_custom_factory_with_kwargs_receives_the_data_shape(small_run):
    KwargsNet.received.clear()
    result = pipeline.run(small_run("model=custom", "model._target_=tests.cli.test_byo.KwargsNet"))
    assert KwargsNet.received and KwargsNet.received[0] == {"in_features": 64, "num_classes": 10}
    assert result.scores.shape == (60, 12)


def test_custom_task_loss_from_a_factory(small_run, tmp_path):
    """task=custom: the user's loss (absolute error) is what the gradients differentiate."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=gen)
    np.savez(tmp_path / "r.npz", x=x.numpy(), y=(x[:, 0] * 1.5).numpy())
    cfg = small_run(
        "dataset=file",
        f"dataset.path={tmp_path / 'r.npz'}",
        "dataset.n_train=14",
        "dataset.n_test=6",
        "task=custom",
        "task.loss._target_=tests.cli.custom_task.make_loss",
        "model=lr",
        "model.num_classes=1",
    )
    result = pipeline.run(cfg)
    assert result.metadata["loss"]["task"] == "custom" and result.scores.shape == (14, 6)
    resolved, split, model, settings = _objects(cfg)
    functions, _ = builders.task_functions(resolved, model, split, settings)
    xb, yb = split.x_test, split.y_test
    params = dict(model.named_parameters())
    value = functions.target_func(params, (xb, yb))
    torch.testing.assert_close(value, (model(xb)[:, 0] - yb).abs().mean())


class PairDataset(torch.utils.data.Dataset):
    """A user's Dataset of dict samples with variable-length token lists (needs its own collate)."""

    def __init__(self, rows: int = 30) -> None:
        gen = torch.Generator().manual_seed(4)
        self.items = []
        for i in range(rows):
            length = 2 + i % 3
            self.items.append(
                {"input_ids": torch.randint(1, 9, (length,), generator=gen), "labels": torch.tensor(i % 2)}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def pad_pairs(items: list) -> dict:
    """Right-pad input_ids with 0 to the longest sample."""
    length = max(int(item["input_ids"].numel()) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : item["input_ids"].numel()] = item["input_ids"]
    return {"input_ids": ids, "labels": torch.stack([item["labels"] for item in items])}


class BagOfTokens(nn.Module):
    """Mean of token embeddings -> class logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.embed(input_ids).mean(dim=1))


def test_any_torch_dataset_with_its_collate_fn(small_run):
    cfg = small_run(
        "dataset=custom",
        "dataset._target_=tests.cli.test_byo.PairDataset",
        "dataset.collate_fn=tests.cli.test_byo.pad_pairs",
        "dataset.n_train=20",
        "dataset.n_test=6",
        "model=custom",
        "model._target_=tests.cli.test_byo.BagOfTokens",
        "loader.train_batch_size=4",  # padded batches of mixed lengths
    )
    result = pipeline.run(cfg)
    assert result.scores.shape == (20, 6) and bool(torch.isfinite(result.scores).all())
    split = builders.build_split(schema.validate_run(builders.to_dict(cfg)))
    base = PairDataset()
    assert [int(base[int(i)]["labels"]) for i in split.train_indices] == [
        int(split.train[j]["labels"]) for j in range(20)
    ]  # rows follow the seeded positions


def test_task_typos_and_misplaced_keys_are_one_line_errors():
    from dattri_cli.precheck import check_run_args

    assert "did you mean regression?" in check_run_args(["task=regresion"])
    assert "task.loss is for task=custom" in check_run_args(["+task.loss._target_=x.y"])
    assert "task=custom needs task.loss._target_" in check_run_args(["task=custom"])
    assert check_run_args(["task=causal_lm", "task.weight_decay=0.01"]) is None
