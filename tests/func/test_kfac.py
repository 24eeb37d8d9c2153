"""K-FAC / EK-FAC factors against their definitions, written out by hand.

The references use closed-form softmax derivatives, explicit patch extraction by
loops and full Jacobians; none of them goes through the hooks under test.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn import functional as F
from torch.nn.functional import cross_entropy, one_hot
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.errors import ConfigError
from dattri_cli.func import kfac
from dattri_cli.func.utils import per_sample_grad

pytestmark = pytest.mark.usefixtures("float64_default")


def ce_loss(model: nn.Module):
    def loss(params: dict, batch: tuple) -> torch.Tensor:
        return cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    return loss


def fit(model, loss, x, y, fisher, batch_size=7, correct=True, names=None):
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = names or kfac.select_layers(model).modules
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    factors, count = kfac.fit_factors(loss, params, loader, model, names, fisher=fisher, correct=correct)
    assert count == x.shape[0]
    return factors


@pytest.mark.parametrize("fisher", ["gauss_newton", "empirical"])
def test_linear_factors_and_correction_match_definitions(fisher: str) -> None:
    torch.manual_seed(0)
    n, d, c = 23, 4, 3
    model = nn.Linear(d, c)
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    f = fit(model, ce_loss(model), x, y, fisher)[""]
    xt = torch.cat([x, torch.ones(n, 1)], dim=1)
    p = torch.softmax(model(x).detach(), dim=1)
    resid = p - one_hot(y, c).double()  # gradient of each sample's CE in its logits
    # per-sample curvature in the logits: softmax Hessian (GN) or residual outer product (EF)
    out_curv = (
        torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if fisher == "gauss_newton"
        else resid[:, :, None] * resid[:, None, :]
    )
    torch.testing.assert_close(f.a_cov, xt.T @ xt / n)
    torch.testing.assert_close(f.s_cov, out_curv.mean(0))
    # corrected eigenvalues: E_i[(q_s_j^T H_i q_s_j) (q_a_k^T x_i)^2]
    s_part = torch.einsum("oj,noq,qj->nj", f.s_evecs, out_curv, f.s_evecs)
    a_part = (xt @ f.a_evecs) ** 2
    torch.testing.assert_close(f.corrected, torch.einsum("nj,nk->jk", s_part, a_part) / n)
    torch.testing.assert_close(f.a_evecs @ torch.diag(f.a_evals) @ f.a_evecs.T, f.a_cov)


def test_flat_layout_round_trip_matches_per_sample_gradients() -> None:
    """``to_matrix`` of autograd's flat per-sample gradient is ``ds a~^T`` (weight rows, bias last)."""
    torch.manual_seed(1)
    model = nn.Linear(5, 2)
    x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
    flat = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    shapes = {"weight": model.weight.shape, "bias": model.bias.shape}

    def loss(v, batch):
        w, b = v[:10].view(2, 5), v[10:]
        return cross_entropy(batch[0] @ w.T + b, batch[1])

    grads = per_sample_grad(loss, flat, (x, y))
    mat = kfac.to_matrix(grads, 2, has_bias=True)
    resid = torch.softmax(model(x).detach(), 1) - one_hot(y, 2).double()
    xt = torch.cat([x, torch.ones(6, 1)], dim=1)
    torch.testing.assert_close(mat, resid[:, :, None] * xt[:, None, :])
    torch.testing.assert_close(kfac.from_matrix(mat, True), grads)
    assert shapes  # the layout is weight row-major, then bias


def naive_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``(n, L, C*kh*kw)`` patches by explicit slicing of the zero-padded input."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[2] - kh) // sh + 1
    ow = (xp.shape[3] - kw) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            rows.append(xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_factors_match_definitions(bias: bool) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2, padding=1, bias=bias)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    n = 9
    x, y = torch.randn(n, 2, 5, 5), torch.randint(0, 4, (n,))
    factors = fit(model, ce_loss(model), x, y, "empirical", batch_size=4)
    f = factors["0"]
    # reference: patches by slicing, ds by autograd on the conv output itself
    z = conv(x).detach().requires_grad_(True)
    logits = model[3](model[2](model[1](z)))
    (ds,) = torch.autograd.grad(cross_entropy(logits, y, reduction="sum"), z)
    ds = ds.reshape(n, 3, -1).transpose(1, 2)  # (n, L, out)
    a = naive_patches(x, conv)
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1)], dim=2)
    L = a.shape[1]
    torch.testing.assert_close(f.a_cov, torch.einsum("nli,nlj->ij", a, a) / (n * L))
    torch.testing.assert_close(f.s_cov, torch.einsum("nli,nlj->ij", ds, ds) / n)
    # the per-sample gradient sum_l ds a^T is autograd's conv gradient in the flat layout
    grad_mat = torch.einsum("nlo,nli->noi", ds, a)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = ["0.weight", "0.bias"] if bias else ["0.weight"]

    def flat_loss(v, batch):
        p = dict(params)
        p["0.weight"] = v[: conv.weight.numel()].view_as(conv.weight)
        if bias:
            p["0.bias"] = v[conv.weight.numel() :]
        return ce_loss(model)(p, batch)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    grads = per_sample_grad(flat_loss, flat, (x, y))
    torch.testing.assert_close(kfac.to_matrix(grads, 3, bias), grad_mat)
    # correction: second moments of those gradients in the eigenbasis
    rot = f.s_evecs.T @ grad_mat @ f.a_evecs
    torch.testing.assert_close(f.corrected, (rot**2).mean(0))


def layer_blocks(model: nn.Module):
    """(module name, slice of the flat vector) for each Linear layer, in order."""
    pos, out = 0, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            size = mod.weight.numel() + mod.bias.numel()
            out.append((name, slice(pos, pos + size)))
            pos += size
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fisher", ["gauss_newton", "empirical"])
def test_eigenvalue_correction_never_increases_frobenius_error(seed: int, fisher: str) -> None:
    torch.manual_seed(seed)
    n, d, h, c = 40, 4, 6, 3
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 5), nn.Tanh(), nn.Linear(5, c))
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = {k: p.shape for k, p in model.named_parameters()}

    def outputs(v, xi):
        params, pos = {}, 0
        for k in names:
            params[k] = v[pos : pos + shapes[k].numel()].view(shapes[k])
            pos += shapes[k].numel()
        return functional_call(model, params, (xi[None],))[0]

    jac = torch.stack([jacrev(outputs)(flat, x[i]) for i in range(n)])  # (n, C, P)
    p = torch.softmax(model(x).detach(), dim=1)
    if fisher == "gauss_newton":
        out_curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        r = p - one_hot(y, c).double()
        out_curv = r[:, :, None] * r[:, None, :]
    truth = torch.einsum("ncp,ncd,ndq->pq", jac, out_curv, jac) / n
    factors = fit(model, ce_loss(model), x, y, fisher, batch_size=16)
    for name, sl in layer_blocks(model):
        block = truth[sl, sl]
        err_kfac = torch.linalg.norm(block - factors[name].dense(corrected=False))
        err_ekfac = torch.linalg.norm(block - factors[name].dense(corrected=True))
        assert err_ekfac <= err_kfac * (1 + 1e-10), (name, err_ekfac, err_kfac)
        assert err_ekfac < 0.999 * err_kfac, (name, err_ekfac, err_kfac)  # the correction does something


def test_single_output_linear_mse_factors_are_exact_gauss_newton() -> None:
    torch.manual_seed(3)
    n, d = 30, 4
    model = nn.Linear(d, 1)
    x, y = torch.randn(n, d), torch.randn(n)

    def loss(params, batch):
        return ((functional_call(model, params, (batch[0],))[:, 0] - batch[1]) ** 2).mean()

    f = fit(model, loss, x, y, "gauss_newton")[""]
    xt = torch.cat([x, torch.ones(n, 1)], dim=1)
    gn = 2.0 * xt.T @ xt / n  # the Hessian of a squared error of a linear model
    torch.testing.assert_close(f.dense(corrected=True), gn)
    torch.testing.assert_close(f.dense(corrected=False), gn)


def test_selection_warns_about_unsupported_layers_and_refuses_named_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Conv1d(1, 1, 2), nn.Linear(4, 2, bias=False))
    sel = kfac.select_layers(model)
    assert sel.modules == ["0", "3"]
    assert sel.param_names == ["0.weight", "0.bias", "3.weight"]
    assert set(sel.excluded) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    with pytest.warns(UserWarning, match=r"1\.weight, 1\.bias \(LayerNorm.*2\.weight.*module_name"):
        kfac.warn_excluded(sel)
    with pytest.warns(UserWarning, match=r"^K-FAC leaves"):
        kfac.warn_excluded(sel, "K-FAC")
    with pytest.raises(ConfigError, match=r"'1'.*LayerNorm"):
        kfac.select_layers(model, ["0", "1"])
    with pytest.raises(ConfigError, match=r"\['nope'\].*supported layers are \['0', '3'\]"):
        kfac.select_layers(model, "nope")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2))
    with pytest.raises(ConfigError, match="no supported layer"):
        kfac.select_layers(grouped)
    with pytest.raises(ConfigError, match="groups=2"):
        kfac.select_layers(grouped, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac.warn_excluded(kfac.select_layers(nn.Sequential(nn.Linear(2, 2))))  # nothing to warn about


def test_shared_layer_and_unused_layer_are_errors() -> None:
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ConfigError, match="ran twice"):
        fit(model, ce_loss(model), x, y, "empirical", names=["0"])
    model2 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))

    def loss(params, batch):
        return cross_entropy(
            functional_call(model2[0], {"weight": params["0.weight"], "bias": params["0.bias"]}, (batch[0],)),
            batch[1],
        )

    with pytest.raises(ConfigError, match=r"not used by the loss"):
        fit(model2, loss, x, y, "empirical", names=["0", "1"])


@pytest.mark.parametrize("positions", [1, 3, 8, 12])
def test_eigen_moments_fast_forms_equal_the_plain_sum(positions, monkeypatch) -> None:
    """Position pairs (L <= 8) and chunked in-place squares (L > 8) give sum_n (sum_l g a^T)^2."""
    monkeypatch.setattr(kfac, "EIGENBASIS_CHUNK_ELEMENTS", 2 * 5 * 7)  # chunks of two samples
    gen = torch.Generator().manual_seed(positions)
    g = torch.randn(5, positions, 7, generator=gen, dtype=torch.float64)
    a = torch.randn(5, positions, 5, generator=gen, dtype=torch.float64)
    brute = sum((g[n].T @ a[n]) ** 2 for n in range(5))
    torch.testing.assert_close(kfac.eigen_moments(g, a, fast=False), brute, rtol=1e-12, atol=0)
    torch.testing.assert_close(kfac.eigen_moments(g, a, fast=True), brute, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
        nn.Conv2d(3, 4, 2, stride=2, padding="valid"),
        nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    ],
)
def test_layer_inputs_of_a_convolution_equal_unfold(conv) -> None:
    """The strided-view patches hold exactly what F.unfold gives (and a 1 for the bias)."""
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    padding = 0 if conv.padding == "valid" else conv.padding
    ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    got = kfac.layer_inputs(conv, x)
    assert torch.equal(got[..., : ref.shape[1]], ref.transpose(1, 2))
    assert got.shape[-1] == ref.shape[1] + int(conv.bias is not None)


def test_a_batch_s_graph_is_freed_once_its_statistics_are_consumed() -> None:
    """The recorder's gradient hooks must not keep a batch's autograd graph (and activations) alive.

    A hook holding the recorder strongly closes graph -> hook -> recorder -> model output -> graph, a
    cycle the garbage collector cannot see through autograd's C++ nodes: every batch leaked (BERT's
    EK-FAC grew by ~0.4 GiB per batch).
    """
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    params = {k: v.detach() for k, v in model.named_parameters()}
    outputs = []
    handle = model.register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out)))

    def loss_func(p, batch):
        x, y = batch
        return cross_entropy(functional_call(model, p, (x,)), y)

    batch = (torch.randn(6, 3), torch.randint(0, 4, (6,)))
    for fisher in kfac.FISHER_CHOICES:
        inputs, passes = kfac.layer_statistics(loss_func, params, batch, model, ["0", "2"], fisher)
        assert len(list(passes)) >= 1
        del inputs, passes
        gc.collect()
        assert outputs and all(ref() is None for ref in outputs), fisher
        outputs.clear()
    handle.remove()
