"""Task loss/target builders: values, per-sample gradients against hand-written losses, integer inputs."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from dattri_cli.errors import ConfigError
from dattri_cli.func.batch import BATCH_OF_ONE_IN_DIMS, SAMPLE_IN_DIMS, add_leading_dim
from dattri_cli.models import MLP
from dattri_cli.models.train import l2_penalty, make_loss_funcs
from dattri_cli.tasks import build_task, causal_lm, classification, model_loss, regression


def _params(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _per_sample_reference(model: nn.Module, loss_of_one, samples) -> List[Dict[str, Tensor]]:
    """Autograd gradients of a hand-written loss, one sample at a time (no vmap, no task code)."""
    out = []
    for sample in samples:
        model.zero_grad()
        loss_of_one(model, *sample).backward()
        out.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return out


def _check_per_sample(funcs, params, batch, reference) -> None:
    """The task's per-sample gradients, both calling conventions, equal ``reference``."""
    for in_dims, data in ((SAMPLE_IN_DIMS, batch), (BATCH_OF_ONE_IN_DIMS, add_leading_dim(batch))):
        grads = vmap(grad(funcs.loss_func), in_dims=in_dims)(params, data)
        for i, expected in enumerate(reference):
            for name, value in expected.items():
                torch.testing.assert_close(grads[name][i], value, rtol=1e-5, atol=1e-6)


def test_classification_matches_the_builtin_loss_with_and_without_l2() -> None:
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=[4])
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = _params(model)
    ours = classification(model, sample_ndim=1, weight_decay=0.01)
    theirs_loss, theirs_target = make_loss_funcs(model, 0.01, 1)
    for data in ((x, y), (x[2], y[2])):
        torch.testing.assert_close(ours.loss_func(params, data), theirs_loss(params, data))
        torch.testing.assert_close(ours.target_func(params, data), theirs_target(params, data))
    assert ours.weight_decay == 0.01
    plain = classification(model, sample_ndim=1)
    assert plain.weight_decay == 0.0
    torch.testing.assert_close(plain.loss_func(params, (x, y)), plain.target_func(params, (x, y)))
    torch.testing.assert_close(
        ours.loss_func(params, (x, y)) - plain.loss_func(params, (x, y)), l2_penalty(params, 0.01)
    )
    p = ours.correct_probability_func(params, (x[0], y[0]))
    torch.testing.assert_close(p, torch.softmax(model(x[:1]), -1)[0, y[0]])


def test_classification_refuses_float_labels() -> None:
    model = MLP(2, 2, hidden=[])
    with pytest.raises(TypeError, match="task=regression"):
        classification(model).loss_func(_params(model), (torch.zeros(3, 2), torch.zeros(3)))


def test_regression_per_sample_gradients_equal_hand_written_squared_error() -> None:
    torch.manual_seed(1)
    model = MLP(4, 1, hidden=[5])
    x, y = torch.randn(5, 4), torch.randn(5) * 3  # float targets: 2.99 stays 2.99
    funcs = regression(model, sample_ndim=1)
    reference = _per_sample_reference(model, lambda m, xi, yi: (m(xi[None])[0, 0] - yi) ** 2, zip(x, y))
    _check_per_sample(funcs, _params(model), (x, y), reference)
    # several outputs: mean over outputs and samples
    wide = MLP(4, 2, hidden=[])
    target = torch.randn(5, 2)
    torch.testing.assert_close(
        regression(wide).target_func(_params(wide), (x, target)), ((wide(x) - target) ** 2).mean()
    )
    with pytest.raises(ValueError, match="outputs shape"):
        regression(wide).loss_func(_params(wide), (x, y))


class TinyLM(nn.Module):
    """Embedding -> causal running mean -> vocabulary logits; records the dtype its embedding receives."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)
        self.seen: List[torch.dtype] = []
        self.embed.register_forward_pre_hook(lambda module, args: self.seen.append(args[0].dtype))  # noqa: ARG005

    def forward(self, input_ids: Tensor, attention_mask: Tensor = None) -> Dict[str, Tensor]:  # noqa: ARG002
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return {"logits": self.out(torch.tanh(h.cumsum(1) / steps))}


def _hand_written_lm_loss(model: nn.Module, ids: Tensor, length: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one unpadded sequence, written out token by token."""
    n = int(length)
    logits = model(ids[None, :n])["logits"][0]
    terms = [-torch.log_softmax(logits[t], -1)[ids[t + 1]] for t in range(n - 1)]
    return torch.stack(terms).mean()


def test_causal_lm_per_sample_gradients_equal_hand_written_loss_and_ids_stay_integer() -> None:
    torch.manual_seed(2)
    model = TinyLM()
    lengths = torch.tensor([5, 3, 4, 2])
    ids = torch.randint(1, 11, (4, 5))
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    ids = ids * mask
    batch = {"input_ids": ids, "attention_mask": mask}
    funcs = causal_lm(model)
    reference = _per_sample_reference(model, _hand_written_lm_loss, zip(ids, lengths))
    model.seen.clear()
    _check_per_sample(funcs, _params(model), batch, reference)
    assert model.seen and set(model.seen) == {torch.int64}
    # labels with -100 at padding say the same as the mask
    labelled = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100)}
    torch.testing.assert_close(
        funcs.target_func(_params(model), labelled), funcs.target_func(_params(model), batch)
    )
    # the batch value is the mean over sequences of each sequence's mean loss
    per_seq = torch.stack([_hand_written_lm_loss(model, i, n) for i, n in zip(ids, lengths)]).detach()
    torch.testing.assert_close(funcs.target_func(_params(model), batch), per_seq.mean())


class OwnLoss(nn.Module):
    """A model computing its own loss from ``labels`` (as Hugging Face models do), returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: Tensor, labels: Tensor = None) -> Dict[str, Tensor]:
        logits = self.linear(x)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": 2.0 * nn.functional.cross_entropy(logits, labels)}


def test_model_loss_uses_the_models_own_loss_and_l2_only_when_asked() -> None:
    torch.manual_seed(3)
    model = OwnLoss()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    params = _params(model)
    funcs = model_loss(model)
    torch.testing.assert_close(
        funcs.loss_func(params, {"x": x, "labels": y}), 2.0 * nn.functional.cross_entropy(model.linear(x), y)
    )
    torch.testing.assert_close(
        funcs.loss_func(params, (x[1], y[1])), 2.0 * nn.functional.cross_entropy(model.linear(x[1:2]), y[1:2])
    )
    # classification unwraps the dict output to its logits
    torch.testing.assert_close(
        classification(model).target_func(params, (x, y)), nn.functional.cross_entropy(model.linear(x), y)
    )
    regularised = build_task("model_loss", model, weight_decay=0.5)
    torch.testing.assert_close(
        regularised.loss_func(params, (x, y)) - funcs.loss_func(params, (x, y)), l2_penalty(params, 0.5)
    )
    torch.testing.assert_close(regularised.target_func(params, (x, y)), funcs.target_func(params, (x, y)))
    with pytest.raises(ConfigError, match="one of classification"):
        build_task("ranking", model)
    with pytest.raises(ConfigError, match="weight_decay"):
        build_task("regression", model, weight_decay=-1.0)


def test_images_are_told_from_batches_by_sample_ndim() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 4, (3,))
    model(x)
    funcs = classification(model, sample_ndim=3)
    params = _params(model)
    each = torch.stack([funcs.target_func(params, (x[i], y[i])) for i in range(3)])
    torch.testing.assert_close(each.mean(), funcs.target_func(params, (x, y)))
