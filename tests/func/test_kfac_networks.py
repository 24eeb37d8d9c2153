"""K-FAC / EK-FAC on real network shapes: in-place ReLU, ModelOutputs, GPT-2's Conv1D, many outputs.

The references never go through the hooks under test: layer inputs come from an
out-of-place twin of the model, output gradients and Jacobians from ``torch.func``
with a perturbation ``delta`` added to the layer output, and the corrected
eigenvalues from per-sample weight Jacobians.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.func import kfac

pytestmark = pytest.mark.usefixtures("float64_default")


class ResBlockNet(nn.Module):
    """A stem conv followed directly by an in-place ReLU, a basic block (conv-BN-ReLU-conv-BN + skip,
    ``out += identity`` in place as torchvision writes it) and a Linear -> in-place ReLU -> Linear head."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.relu0 = nn.ReLU(inplace=inplace)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.relu3 = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.stem(x))
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        out = self.relu2(out)
        return self.fc2(self.relu3(self.fc1(out.flatten(1))))


def _nets():
    torch.manual_seed(0)
    net = ResBlockNet(inplace=True)
    with torch.no_grad():  # non-trivial running statistics, then eval (per-sample gradients are defined)
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    twin = ResBlockNet(inplace=False).eval()
    twin.load_state_dict(net.state_dict())
    return net, twin


LAYERS = ["stem", "conv1", "conv2", "fc1", "fc2"]


def _layer_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, L, in[+1])`` layer inputs by the definition (patches by explicit slicing)."""
    if isinstance(module, nn.Conv2d):
        (kh, kw), (ph, pw) = module.kernel_size, module.padding
        xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        rows = [
            xp[:, :, i : i + kh, j : j + kw].reshape(x.shape[0], -1)
            for i in range(xp.shape[2] - kh + 1)
            for j in range(xp.shape[3] - kw + 1)
        ]
        a = torch.stack(rows, dim=1)
    else:
        a = x[:, None, :]
    if module.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1)], dim=2)
    return a


def _reference(twin: ResBlockNet, x: torch.Tensor, y: torch.Tensor, fisher: str):
    """A, S and the corrected eigenvalues (given eigenbases) from torch.func on the out-of-place twin."""
    n = x.shape[0]
    inputs, outputs = {}, {}

    def keep(name: str):
        def hook(module, args, out) -> None:
            inputs[name], outputs[name] = args[0].detach(), out.detach()

        return hook

    handles = [getattr(twin, nm).register_forward_hook(keep(nm)) for nm in LAYERS]
    logits = twin(x).detach()
    for h in handles:
        h.remove()
    probs = torch.softmax(logits, dim=1)
    if fisher == "gauss_newton":
        out_curv = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    else:
        r = probs - torch.nn.functional.one_hot(y, 3).double()
        out_curv = r[:, :, None] * r[:, None, :]

    def logits_with_delta(deltas: dict, xi: torch.Tensor) -> torch.Tensor:
        hs = [
            getattr(twin, nm).register_forward_hook(lambda _m, _i, o, nm=nm: o + deltas[nm][None])
            for nm in LAYERS
        ]
        try:
            return twin(xi[None])[0]
        finally:
            for h in hs:
                h.remove()

    zeros = {nm: torch.zeros_like(outputs[nm][0]) for nm in LAYERS}
    jac_out = vmap(jacrev(logits_with_delta), in_dims=(None, 0))(zeros, x)  # nm -> (n, C, *out_shape)
    params = {k: v.detach() for k, v in twin.named_parameters()}
    jac_w = vmap(jacrev(lambda p, xi: functional_call(twin, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    ref = {}
    for nm in LAYERS:
        module = getattr(twin, nm)
        a = _layer_matrix(module, inputs[nm])
        j = jac_out[nm].reshape(n, 3, module.weight.shape[0], -1)  # (n, C, out, L)
        s = torch.einsum("ncol,ncd,ndpl->op", j, out_curv, j) / n
        a_cov = torch.einsum("nli,nlj->ij", a, a) / (n * a.shape[1])
        jw = jac_w[f"{nm}.weight"].reshape(n, 3, module.weight.shape[0], -1)
        if module.bias is not None:
            jw = torch.cat([jw, jac_w[f"{nm}.bias"][..., None]], dim=3)
        ref[nm] = (a_cov, s, jw)
    return ref, out_curv


@pytest.mark.parametrize("fisher", ["gauss_newton", "empirical"])
def test_resnet_block_with_inplace_relu_matches_out_of_place_reference(fisher: str) -> None:
    net, twin = _nets()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 2, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, batch):
        return cross_entropy(functional_call(net, p, (batch[0],)), batch[1])

    assert kfac.select_layers(net).modules == LAYERS
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    factors, count = kfac.fit_factors(loss, params, loader, net, LAYERS, fisher=fisher)
    assert count == 10
    ref, out_curv = _reference(twin, x, y, fisher)
    for nm in LAYERS:
        a_cov, s_cov, jw = ref[nm]
        f = factors[nm]
        torch.testing.assert_close(f.a_cov, a_cov)
        torch.testing.assert_close(f.s_cov, s_cov)
        rot = torch.einsum("oj,ncoi,ik->ncjk", f.s_evecs, jw, f.a_evecs)  # per-output Jacobian rows rotated
        corrected = torch.einsum("ncjk,ncd,ndjk->jk", rot, out_curv, rot) / 10
        torch.testing.assert_close(f.corrected, corrected)


class Wrapped(nn.Module):
    """Returns a dict-like output with ``.logits`` (as Hugging Face models do) or a tuple."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        if self.kind == "tuple":
            return (logits, logits.sum())

        class Output(dict):
            pass

        out = Output(logits=logits)
        out.logits = logits
        return out


@pytest.mark.parametrize("kind", ["model_output", "tuple"])
def test_model_output_is_unwrapped_to_logits(kind: str) -> None:
    torch.manual_seed(2)
    inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    wrapped = Wrapped(inner, kind)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)

    def plain_loss(p, batch):
        return cross_entropy(functional_call(inner, p, (batch[0],)), batch[1])

    def wrapped_loss(p, batch):
        out = functional_call(wrapped, p, (batch[0],))
        return cross_entropy(out[0] if kind == "tuple" else out.logits, batch[1])

    plain, _ = kfac.fit_factors(
        plain_loss, {k: v.detach() for k, v in inner.named_parameters()}, loader, inner, ["0", "2"]
    )
    got, _ = kfac.fit_factors(
        wrapped_loss,
        {k: v.detach() for k, v in wrapped.named_parameters()},
        loader,
        wrapped,
        ["inner.0", "inner.2"],
    )
    for a, b in (("0", "inner.0"), ("2", "inner.2")):
        assert torch.equal(plain[a].s_cov, got[b].s_cov) and torch.equal(plain[a].corrected, got[b].corrected)


class TokenModel(nn.Module):
    """``(n, T)`` ids -> ``(n, T, V)`` logits: embedding, a Linear per position, a Linear head."""

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(ids))))


def _lm_loss(model):
    def loss(p, batch):
        logits = functional_call(model, p, (batch[0],))
        per_seq = cross_entropy(logits[:, :-1].transpose(1, 2), batch[0][:, 1:], reduction="none").mean(1)
        return per_seq.mean()

    return loss


def test_sampled_output_pseudo_gradients_estimate_the_exact_gauss_newton_factors() -> None:
    torch.manual_seed(3)
    model = TokenModel()
    ids = torch.randint(0, 6, (12, 5))
    loader = DataLoader(TensorDataset(ids), batch_size=6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = ["hidden", "head"]
    exact, _ = kfac.fit_factors(_lm_loss(model), params, loader, model, names)
    sampled, _ = kfac.fit_factors(
        _lm_loss(model), params, loader, model, names, num_output_samples=400, seed=0
    )
    again, _ = kfac.fit_factors(_lm_loss(model), params, loader, model, names, num_output_samples=400, seed=0)
    for nm in names:
        assert torch.equal(sampled[nm].s_cov, again[nm].s_cov)  # seeded
        torch.testing.assert_close(sampled[nm].a_cov, exact[nm].a_cov)
        err = torch.linalg.norm(sampled[nm].s_cov - exact[nm].s_cov) / torch.linalg.norm(exact[nm].s_cov)
        assert err < 0.1, (nm, float(err))
        rel = torch.linalg.norm(sampled[nm].corrected - exact[nm].corrected) / torch.linalg.norm(
            exact[nm].corrected
        )
        assert rel < 0.15, (nm, float(rel))
    few, _ = kfac.fit_factors(_lm_loss(model), params, loader, model, names, num_output_samples=1, seed=0)
    assert all(torch.isfinite(f.corrected).all() for f in few.values())


def test_position_blocks_only_for_separable_losses() -> None:
    z = torch.randn(3, 4, 5, requires_grad=True)
    separable = (torch.logsumexp(z, dim=-1) - z[..., 0]).sum()
    blocks = kfac._output_hessian_blocks(separable, z)
    assert blocks is not None and blocks.shape == (3, 4, 5, 5)
    full = kfac._output_hessian(separable, z).reshape(3, 4, 5, 4, 5)
    for t in range(4):
        torch.testing.assert_close(blocks[:, t], full[:, t, :, t, :])
    coupled = (torch.logsumexp(z.reshape(3, -1), dim=-1)).sum()  # one softmax over all positions
    assert kfac._output_hessian_blocks(coupled, z) is None
    assert kfac._output_hessian_blocks(separable, z[:, 0]) is None  # no positions
    with pytest.raises(Exception, match="num_output_samples"):
        kfac.check_num_output_samples(0)


def test_conv1d_factors_equal_linear_factors() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    assert transformers is not None
    torch.manual_seed(4)
    linear = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    conv = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    with torch.no_grad():
        for lin, c1d in ((linear[0], conv[0]), (linear[2], conv[2])):
            c1d.weight.copy_(lin.weight.T)
            c1d.bias.copy_(lin.bias)
    assert kfac.select_layers(conv).modules == ["0", "2"]
    x, y = torch.randn(11, 2, 4), torch.randint(0, 3, (11, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)

    def loss_of(model):
        def loss(p, batch):
            return cross_entropy(functional_call(model, p, (batch[0],)).transpose(1, 2), batch[1])

        return loss

    fl, _ = kfac.fit_factors(loss_of(linear), dict(linear.named_parameters()), loader, linear, ["0", "2"])
    fc, _ = kfac.fit_factors(loss_of(conv), dict(conv.named_parameters()), loader, conv, ["0", "2"])
    for nm in ["0", "2"]:
        assert fc[nm].transposed and not fl[nm].transposed
        torch.testing.assert_close(fc[nm].a_cov, fl[nm].a_cov)
        torch.testing.assert_close(fc[nm].s_cov, fl[nm].s_cov)
        torch.testing.assert_close(fc[nm].corrected, fl[nm].corrected)
        # the flat layouts differ (weight (in, out) vs (out, in)): inverse_apply maps each correctly
        size = conv.get_submodule(nm).weight.numel()
        v_lin = torch.randn(2, size + fl[nm].out_features)
        w = v_lin[:, :size].reshape(2, fl[nm].out_features, -1).transpose(1, 2).reshape(2, -1)
        v_conv = torch.cat([w, v_lin[:, size:]], dim=1)
        out_lin = fl[nm].inverse_apply(v_lin, 0.1)
        out_conv = fc[nm].inverse_apply(v_conv, 0.1)
        w_back = out_conv[:, :size].reshape(2, -1, fl[nm].out_features).transpose(1, 2).reshape(2, -1)
        torch.testing.assert_close(torch.cat([w_back, out_conv[:, size:]], dim=1), out_lin)
        trace_c, trace_l = fc[nm].dense().diagonal().sum(), fl[nm].dense().diagonal().sum()
        torch.testing.assert_close(trace_c, trace_l)


def test_output_hessian_roots_survive_a_failing_batched_eigh(monkeypatch) -> None:
    real = torch.linalg.eigh
    hess = torch.randn(4, 5, 5)
    hess = hess @ hess.transpose(1, 2)
    hess[1] = 0.0  # an all-zero Hessian (a saturated sample)
    expected = kfac._psd_roots(hess)

    def failing(mat, *args, **kwargs):
        if mat.dim() == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return real(mat, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    roots = kfac._psd_roots(hess)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), hess)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), expected @ expected.transpose(1, 2))
    bad = hess.clone()
    bad[2, 0, 0] = float("nan")
    roots = kfac._psd_roots(bad)  # NaN roots for that sample: the factor check names the layer
    assert torch.isnan(roots[2]).all() and torch.isfinite(roots[[0, 1, 3]]).all()


def test_tied_weights_are_left_out_under_either_name() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.mid = nn.Linear(4, 4)
            self.last = nn.Linear(4, 4, bias=False)
            self.last.weight = self.first.weight  # registered first under `first`

        def forward(self, x):
            return self.last(torch.tanh(self.mid(self.first(x))))

    sel = kfac.select_layers(Tied())
    assert sel.modules == ["mid"]
    assert "tied to the weight of module 'last'" in sel.excluded["first.weight"]
    assert set(sel.excluded) == {"first.weight", "first.bias"}  # `last.weight` is `first.weight`
    with pytest.raises(Exception, match="'last': its weight is tied to first.weight"):
        kfac.select_layers(Tied(), ["last"])
