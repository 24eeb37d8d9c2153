"""EK-FAC / K-FAC scores through the layers backend (in the eigenbasis) equal the torch.func path.

The ``"func"`` path forms every per-sample gradient, solves the test rows through the
eigenbasis and rotates them back; ``"layers"`` rotates each layer's captured inputs and
output gradients into the eigenbasis and scores there. Both use the same fitted factors,
so in float64 the scores agree to rounding. The networks cover Linear and Conv2d layers
with and without bias, a convolution that sees 1x1 maps (most activation-factor rows zero)
and a layer left out of the selection.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.influence_function import IFAttributorEKFAC, IFAttributorKFAC
from dattri_cli.errors import ConfigError
from dattri_cli.func import kfac
from dattri_cli.task import AttributionTask

TOL = {"rtol": 1e-9, "atol": 1e-11}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))


class SmallConvNet(nn.Module):
    """Conv (bias) -> conv (no bias, stride 2) -> conv on 1x1 maps (padding 1: 8 of 9 taps zero) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, padding=0, bias=False)
        self.conv3 = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))  # 3x3 -> 1x1
        x = torch.relu(self.conv3(x))
        return self.head(x.flatten(1))


def make_task(model: nn.Module, penalty: float = 0.0) -> AttributionTask:
    torch.manual_seed(0)
    model = model.double()

    def loss(params, batch):
        out = cross_entropy(functional_call(model, params, (batch[0],)), batch[1])
        if penalty:
            out = out + penalty * sum((p**2).sum() for p in params.values())
        return out

    ckpts = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    ckpts.append({k: v + 0.1 * torch.randn_like(v) for k, v in ckpts[0].items()})
    return AttributionTask(loss, model, ckpts)


def data(shape, n_train=13, n_test=5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_train + n_test, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_test,), generator=gen)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def scores_both(cls, task, train, test, **kwargs):
    out = {}
    for backend in ("func", "layers"):
        attributor = cls(task, grad_backend=backend, **kwargs)
        attributor.cache(DataLoader(train, batch_size=4))
        tr, te = DataLoader(train, batch_size=4), DataLoader(test, batch_size=3)
        out[backend] = (attributor, attributor.attribute(tr, te), attributor.self_attribute(tr))
        assert (attributor._layers is None) == (backend == "func")
    return out


@pytest.mark.parametrize("cls", [IFAttributorEKFAC, IFAttributorKFAC])
@pytest.mark.parametrize("damping", [0.05, None])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_layers_scores_equal_func_scores(cls, damping, net) -> None:
    model, shape = (mlp(), (5,)) if net == "mlp" else (SmallConvNet(), (2, 3, 3))
    task = make_task(model)
    train, test = data(shape)
    got = scores_both(cls, task, train, test, damping=damping)
    (_, s_func, self_func), (att, s_layers, self_layers) = got["func"], got["layers"]
    assert s_func.shape == (13, 5) and s_func.abs().max() > 0
    torch.testing.assert_close(s_layers, s_func, **TOL)
    torch.testing.assert_close(self_layers, self_func, **TOL)
    # the same damping, checked and recorded per layer (the layers path sums EK-FAC's moments in GEMMs)
    layers_diag = att.diagnostics["checkpoint_1"]["layers"]
    func_diag = got["func"][0].diagnostics["checkpoint_1"]["layers"]
    assert list(layers_diag) == list(func_diag) == att.module_name
    for name, entry in func_diag.items():
        assert layers_diag[name]["damping_rule"] == entry["damping_rule"]
        for key in ("damping", "mean_eigenvalue", "max_eigenvalue"):
            assert layers_diag[name][key] == pytest.approx(entry[key], rel=1e-10)
    if net == "conv":  # the 1x1-map convolution's activation factor is mostly zero rows
        a_cov = att.factors[0]["conv3"].a_cov
        assert int((a_cov == 0).all(dim=0).sum()) == 3 * 8


@pytest.mark.parametrize("method", ["l", "theta"])
def test_relatif_through_layers_equals_func(method) -> None:
    task = make_task(SmallConvNet())
    train, test = data((2, 3, 3))
    out = {}
    for backend in ("func", "layers"):
        attributor = IFAttributorEKFAC(task, damping=None, grad_backend=backend)
        attributor.cache(DataLoader(train, batch_size=4))
        tr, te = DataLoader(train, batch_size=4), DataLoader(test, batch_size=3)
        out[backend] = (
            attributor.attribute(tr, te, relatif_method=method),
            attributor.self_attribute(tr, relatif_method=method),
        )
    torch.testing.assert_close(out["layers"][0], out["func"][0], **TOL)
    torch.testing.assert_close(out["layers"][1], out["func"][1], **TOL)


def test_penalty_in_the_loss_is_carried_through_the_eigenbasis() -> None:
    """A weight penalty inside the loss adds the same vector to every per-sample gradient."""
    task = make_task(mlp(), penalty=0.3)
    train, test = data((5,))
    got = scores_both(IFAttributorEKFAC, task, train, test, damping=0.1)
    torch.testing.assert_close(got["layers"][1], got["func"][1], **TOL)
    torch.testing.assert_close(got["layers"][2], got["func"][2], **TOL)


def test_selected_layers_only() -> None:
    task = make_task(SmallConvNet())
    train, test = data((2, 3, 3))
    got = scores_both(IFAttributorKFAC, task, train, test, damping=0.02, module_name=["conv2", "head"])
    assert got["layers"][0]._layers.layers == ["conv2", "head"]
    torch.testing.assert_close(got["layers"][1], got["func"][1], **TOL)


def test_auto_keeps_small_models_on_func_and_float32_agrees() -> None:
    torch.manual_seed(0)
    model = SmallConvNet()
    task = AttributionTask(
        lambda p, b: cross_entropy(functional_call(model, p, (b[0],)), b[1]),
        model,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )
    train, test = data((2, 3, 3))
    train = TensorDataset(train.tensors[0].float(), train.tensors[1])
    test = TensorDataset(test.tensors[0].float(), test.tensors[1])
    auto = IFAttributorEKFAC(task, damping=None)
    auto.cache(DataLoader(train, batch_size=4))
    s_auto = auto.attribute(DataLoader(train, batch_size=4), DataLoader(test, batch_size=3))
    assert auto._layers is None  # under a million parameters
    layers = IFAttributorEKFAC(task, damping=None, grad_backend="layers")
    layers.cache(DataLoader(train, batch_size=4))
    s_layers = layers.attribute(DataLoader(train, batch_size=4), DataLoader(test, batch_size=3))
    assert s_layers.dtype == s_auto.dtype == torch.float32
    torch.testing.assert_close(s_layers, s_auto, rtol=1e-4, atol=1e-5 * float(s_auto.abs().max()))


def test_bad_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="grad_backend"):
        IFAttributorEKFAC(make_task(mlp()), grad_backend="fast")


def test_eigenbasis_layer_equals_inverse_apply() -> None:
    """Both rotation orders (factors first, gradient first) give ``<g_i, (C + dI)^-1 g_j>``."""
    gen = torch.Generator().manual_seed(0)
    out, k_in = 4, 6
    mats = [torch.randn(n, n, generator=gen, dtype=torch.float64) for n in (k_in, out)]
    a_cov, s_cov = (m @ m.T for m in mats)
    f = kfac.LayerFactors("layer", out, True, a_cov, s_cov)
    f.a_evals, f.a_evecs = torch.linalg.eigh(a_cov)
    f.s_evals, f.s_evecs = torch.linalg.eigh(s_cov)
    f.corrected = torch.rand(out, k_in, generator=gen, dtype=torch.float64)
    for positions in (1, 40):  # 1: factors rotated first; 40: the formed gradient is rotated
        f.a_evecs = torch.linalg.eigh(a_cov)[1]
        layer = kfac.EigenbasisLayer(f, 0.1, True, torch.float64)
        a = torch.randn(3, positions, k_in, generator=gen, dtype=torch.float64)
        d = torch.randn(3, positions, out, generator=gen, dtype=torch.float64)
        at = torch.randn(2, positions, k_in, generator=gen, dtype=torch.float64)
        dt = torch.randn(2, positions, out, generator=gen, dtype=torch.float64)
        flat = kfac.from_matrix(torch.einsum("blo,bli->boi", d, a), True)
        flat_t = kfac.from_matrix(torch.einsum("blo,bli->boi", dt, at), True)
        expected = flat @ f.inverse_apply(flat_t, 0.1).T
        torch.testing.assert_close(layer.scores(a, d, layer.test_side(at, dt)), expected, **TOL)
        # test-side columns that are zero for every test sample are dropped, with the same scores
        at[:, :, 2] = 0.0  # an input feature the test samples never see ...
        f.a_evecs = torch.eye(k_in, dtype=torch.float64)  # ... and a basis that keeps it apart
        layer = kfac.EigenbasisLayer(f, 0.1, True, torch.float64)
        flat_t = kfac.from_matrix(torch.einsum("blo,bli->boi", dt, at), True)
        expected = flat @ f.inverse_apply(flat_t, 0.1).T
        kept, cols = kfac.EigenbasisLayer.live_columns(layer.test_side(at, dt))
        assert cols.tolist() == [0, 1, 3, 4, 5] and kept.shape == (2, out, 5)
        torch.testing.assert_close(layer.scores(a, d, kept, cols=cols), expected, **TOL)


def test_merge_columns_joins_batches_on_the_union() -> None:
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(2, 3, 5, generator=gen)
    second = torch.randn(1, 3, 5, generator=gen)
    first[:, :, [1, 4]] = 0.0
    second[:, :, [1, 2]] = 0.0
    parts = [kfac.EigenbasisLayer.live_columns(t) for t in (first, second)]
    merged, cols = kfac.EigenbasisLayer.merge_columns(parts)
    assert cols.tolist() == [0, 2, 3, 4]
    torch.testing.assert_close(merged, torch.cat([first, second])[:, :, cols], rtol=0, atol=0)
    dense = torch.randn(2, 3, 5, generator=gen)  # a batch with every column kept
    merged, cols = kfac.EigenbasisLayer.merge_columns([parts[0], (dense, None)])
    assert cols is None
    torch.testing.assert_close(merged, torch.cat([first, dense]), rtol=0, atol=0)
