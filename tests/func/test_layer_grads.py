"""Per-layer per-sample gradients from hooks against ``torch.func.vmap(grad(...))`` of the same loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.functional import cross_entropy

from dattri_cli.errors import ConfigError
from dattri_cli.func import layer_grads as lg

pytestmark = pytest.mark.usefixtures("float64_default")


def per_sample_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return cross_entropy(model(batch[0]), batch[1], reduction="none")


def mean_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return cross_entropy(model(batch[0]), batch[1])


def reference(model: nn.Module, batch: tuple) -> dict:
    """Per-sample gradients of the per-sample loss for every trainable parameter, ``{name: (B, numel)}``."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **frozen}, (x.unsqueeze(0),))
        return cross_entropy(out, y.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, *batch)
    return {k: v.reshape(v.shape[0], -1) for k, v in g.items()}


def layer_reference(model: nn.Module, ref: dict, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    return torch.cat([ref[prefix + n] for n in lg.param_names(module)], dim=1)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(
            inplace=True
        )  # in place on the conv output: the hooks must see the pre-ReLU gradient
        self.conv2 = nn.Conv2d(4, 5, (3, 2), stride=2, bias=False)
        self.fc = nn.Linear(5 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.flatten(1))


class TinyTransformer(nn.Module):
    """Embedding + LayerNorm + a shared Linear used twice + a pooled classifier."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))
        h = h + torch.tanh(self.mix(h))
        h = h + torch.tanh(self.mix(h))  # the same layer again: its uses add up
        attn = torch.softmax(h @ h.transpose(1, 2) / 2.0, dim=-1)
        return self.head((attn @ h).mean(dim=1))


class Scale(nn.Module):
    """A layer with no factored form: elementwise scale and shift."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.shift = nn.Parameter(torch.zeros(width) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def conv_batch(n: int = 5, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def token_batch(n: int = 4, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 7), generator=g)
    ids[0, :3] = 0  # padding tokens
    ids[1, :] = 5  # one id repeated: its rows add up
    return ids, torch.randint(0, 3, (n,), generator=g)


def check_all_layers(model: nn.Module, batch: tuple, expected_kinds: dict, reduction: str = "none") -> None:
    loss = per_sample_loss if reduction == "none" else mean_loss
    ref = reference(model, batch)
    caps = lg.capture(model, loss, batch, reduction=reduction)
    assert {n: c.kind for n, c in caps.items()} == expected_kinds
    for name, cap in caps.items():
        torch.testing.assert_close(cap.per_sample_grads(), layer_reference(model, ref, name), msg=name)


def test_conv_net_per_sample_grads():
    torch.manual_seed(0)
    check_all_layers(ConvNet(), conv_batch(), {"conv1": "linear", "conv2": "linear", "fc": "linear"})


def test_mean_reduction_gives_the_per_sample_loss_gradient():
    """``mean`` is rescaled by B: the gradients are those of l_i, not of l_i / B."""
    torch.manual_seed(0)
    model = ConvNet()
    check_all_layers(model, conv_batch(), {"conv1": "linear", "conv2": "linear", "fc": "linear"}, "mean")
    caps_sum = lg.capture(model, lambda m, b: per_sample_loss(m, b).sum(), conv_batch(), reduction="sum")
    caps_none = lg.capture(model, per_sample_loss, conv_batch())
    torch.testing.assert_close(caps_sum["fc"].per_sample_grads(), caps_none["fc"].per_sample_grads())


def test_transformer_block_per_sample_grads():
    torch.manual_seed(1)
    kinds = {"emb": "embedding", "norm": "layernorm", "mix": "linear", "head": "linear"}
    check_all_layers(TinyTransformer(), token_batch(), kinds)


def test_fallback_layers():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Flatten(), Scale(3 * 4), nn.PReLU(), nn.Linear(12, 3), nn.GroupNorm(1, 3)
    )
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(6, 2, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    kinds = {"0": "fallback", "2": "fallback", "3": "fallback", "4": "linear", "5": "fallback"}
    check_all_layers(model, batch, kinds)


def test_frozen_weight_and_unused_output():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
    check_all_layers(model, batch, {"0": "fallback", "2": "linear"})


@pytest.mark.parametrize("method", ["factored", "materialised", "auto"])
@pytest.mark.parametrize("net", ["conv", "transformer"])
def test_inner_products_equal_reference(method, net):
    torch.manual_seed(4)
    if net == "conv":
        model, left, right = ConvNet(), conv_batch(5, 0), conv_batch(3, 1)
    else:
        model, left, right = TinyTransformer(), token_batch(4, 0), token_batch(3, 1)
    ref_l, ref_r = reference(model, left), reference(model, right)
    cap_l = lg.capture(model, per_sample_loss, left)
    cap_r = lg.capture(model, per_sample_loss, right)
    per_layer = lg.inner_products(cap_l, cap_r, method=method, per_layer=True)
    for name, value in per_layer.items():
        expected = layer_reference(model, ref_l, name) @ layer_reference(model, ref_r, name).T
        torch.testing.assert_close(value, expected, msg=name)
    full_l = torch.cat([ref_l[k] for k in ref_l], dim=1)
    full_r = torch.cat([ref_r[k] for k in ref_r], dim=1)
    torch.testing.assert_close(lg.inner_products(cap_l, cap_r, method=method), full_l @ full_r.T)
    cache: dict = {}
    for _ in range(2):  # the second call reuses the right side's cached gradients
        torch.testing.assert_close(
            lg.inner_products(cap_l, cap_r, method, right_cache=cache), full_l @ full_r.T
        )
    if method == "materialised":
        assert set(cache) == set(cap_r)


def test_factored_inner_products_do_not_form_gradients(monkeypatch):
    """The factored path never calls per_sample_grads (it would fail here)."""
    torch.manual_seed(5)
    model, batch = TinyTransformer(), token_batch()
    caps = lg.capture(model, per_sample_loss, batch, layers=["emb", "mix", "head"])
    expected = {n: c.per_sample_grads() @ c.per_sample_grads().T for n, c in caps.items()}

    def boom(self):
        raise AssertionError("materialised")

    monkeypatch.setattr(lg.LayerCapture, "per_sample_grads", boom)
    for name, cap in caps.items():
        torch.testing.assert_close(lg.layer_inner_products(cap, cap, "factored", chunk=3), expected[name])


def test_refusals():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="BatchNorm in training mode"):
        lg.capture(model, per_sample_loss, batch)
    model.eval()
    assert set(lg.capture(model, per_sample_loss, batch)) == {"0", "1", "2"}
    with pytest.raises(ConfigError, match="per-sample losses"):
        lg.capture(model, mean_loss, batch)
    with pytest.raises(ConfigError, match="not modules"):
        lg.capture(model, per_sample_loss, batch, layers=["nope"])
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="share a parameter"):
        lg.capture(tied, per_sample_loss, (torch.randn(2, 3), torch.tensor([0, 1])))


def test_only_chosen_layers_and_float32():
    """A float32 model gives float32 factors; unchosen layers are not recorded."""
    torch.manual_seed(6)
    model = ConvNet().float()
    x, y = conv_batch()
    caps = lg.capture(model, per_sample_loss, (x.float(), y), layers=["conv2"])
    assert list(caps) == ["conv2"]
    a, d = caps["conv2"].factors()
    assert a.dtype == torch.float32 and d.dtype == torch.float32
    assert a.shape == (5, 3 * 4, 4 * 3 * 2) and d.shape == (5, 3 * 4, 5)


def test_batchnorm_in_eval_mode_is_factored():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5), nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    )  # fmt: skip
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    model.eval()
    kinds = {"0": "linear", "1": "batchnorm", "4": "linear", "5": "batchnorm", "6": "linear"}
    check_all_layers(model, conv_batch(), kinds)
    caps = lg.capture(model, per_sample_loss, conv_batch())
    assert caps["1"].factors()[0].shape == (5, 36, 4)  # (B, positions, channels)
