"""PerSampleLayers (per-sample loss functions, dattri's convention) and per-layer projections."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dattri_cli.func import layer_grads as lg
from dattri_cli.func.kronecker import KroneckerProjector
from dattri_cli.func.projection import RandomProjector

pytestmark = pytest.mark.usefixtures("float64_default")


class Net(nn.Module):
    """Conv2d + eval BatchNorm + in-place ReLU + LayerNorm + PReLU (a fallback layer) + Linear."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()  # BatchNorm2d needs batched input
        self.norm = nn.LayerNorm(16)
        self.act = nn.PReLU()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 4).flatten(-3)
        return self.fc(self.act(self.norm(h)))


def _model(bn: bool = True) -> Net:
    torch.manual_seed(0)
    model = Net(bn)
    if bn:
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _loss(model: nn.Module, batched: bool, l2: float = 0.01):
    def loss(params: dict, sample: tuple) -> torch.Tensor:
        x, y = sample
        if batched:  # the sample as a batch of one, as the built-in loss does
            out = functional_call(model, params, (x.unsqueeze(0),))
            ce = nn.functional.cross_entropy(out, y.unsqueeze(0))
        else:  # the model called on the unbatched sample (Conv2d takes (C, H, W))
            out = functional_call(model, params, (x,))
            ce = nn.functional.cross_entropy(out, y)
        return ce + l2 * sum((p * p).sum() for p in params.values())

    return loss


def _data(n: int = 6):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _reference(model: nn.Module, loss, data) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(loss), in_dims=(None, 0))(params, data)
    return torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)


def _captures(model: nn.Module, loss, data) -> dict:
    params = {k: v.detach() for k, v in model.named_parameters()}
    recorder = lg.PerSampleLayers(model, lg.check_layer_support(model))
    direct = recorder.direct_gradient(loss, params, [(data[0][0], data[1][0]), (data[0][1], data[1][1])])
    return recorder.capture(loss, params, data, direct)


@pytest.mark.parametrize("batched", [True, False])
def test_captured_gradients_equal_vmap_grad(batched: bool) -> None:
    model = _model(bn=batched)
    loss = _loss(model, batched)
    data = _data()
    caps = _captures(model, loss, data)
    assert caps["act"].kind == lg.FALLBACK and (not batched or caps["bn"].kind == lg.BATCHNORM)
    assert caps["fc"].offset is not None  # the L2 term
    flat = torch.cat([c.per_sample_grads() for c in caps.values()], dim=1)
    ref = _reference(model, loss, data)
    torch.testing.assert_close(flat, ref)
    torch.testing.assert_close(lg.sq_norms(caps), ref.square().sum(dim=1))
    other = _captures(model, loss, (data[0][:4], data[1][:4]))
    for method in ("factored", "materialised", "auto"):
        torch.testing.assert_close(lg.inner_products(caps, other, method=method), ref @ ref[:4].T)


def test_without_a_direct_term_there_is_no_offset() -> None:
    model = _model()
    caps = _captures(model, _loss(model, True, l2=0.0), _data())
    assert all(c.offset is None for c in caps.values())


def test_kronecker_projection_of_an_offset_layer_equals_the_projected_gradient() -> None:
    """``vec(P_out G P_in^T)`` with ``G`` the full per-sample gradient (the L2 offset included)."""
    model = _model()
    caps = _captures(model, _loss(model, True), _data())
    projector = KroneckerProjector(proj_dim=6, seed=4, deterministic=False)
    for name in ("conv", "fc"):
        cap = caps[name]
        g = cap.per_sample_grads()
        out_dim = cap.module.weight.shape[0]
        w = g[:, : cap.module.weight.numel()].reshape(g.shape[0], out_dim, -1)
        full = torch.cat([w, g[:, cap.module.weight.numel() :, None]], dim=2)  # (B, out, in + 1)
        p_in, p_out = projector.matrices(cap, 0, g)
        assert p_in is not None or p_out is not None  # something is projected
        p_in = torch.eye(full.shape[2]) if p_in is None else p_in
        p_out = torch.eye(full.shape[1]) if p_out is None else p_out
        expected = torch.einsum("ko,boi,li->bkl", p_out, full, p_in).reshape(g.shape[0], -1)
        torch.testing.assert_close(projector.project_layer(cap, 0), expected)


def test_dense_projection_by_layer_slices_equals_the_whole_projection() -> None:
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 1000, generator=gen)
    projector = RandomProjector(proj_dim=7, proj_seed=3)
    projector.chunk_rows = 64  # many chunks, layers crossing their edges
    whole = projector.project(grads, ckpt_idx=2)
    bounds = [0, 10, 300, 301, 777, 1000]
    slices = [(a, grads[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(
        projector.project_slices(slices, 1000, ckpt_idx=2), whole, rtol=1e-5, atol=1e-5
    )
    scale = math.sqrt(7)
    torch.testing.assert_close(
        whole * scale, grads @ torch.cat([c for _, _, c in projector._chunks(2, 1000, "cpu")])
    )


def test_the_matrix_is_drawn_once_per_checkpoint_within_the_budget() -> None:
    torch.set_default_dtype(torch.float32)
    grads = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    kept = RandomProjector(proj_dim=8, proj_seed=1)
    kept.chunk_rows = 100
    first = kept.project(grads, 0)
    kept.project(grads[:2], 0)
    kept.project_slices([(0, grads)], 1000, 0)
    assert kept.chunks_generated == 10  # once per chunk for the whole run of checkpoint 0
    streamed = RandomProjector(proj_dim=8, proj_seed=1, max_matrix_mb=0)  # nothing kept: redrawn each use
    streamed.chunk_rows = 100
    assert torch.equal(streamed.project(grads, 0), first)
    streamed.project(grads, 0)
    assert streamed.chunks_generated == 20
    partial = RandomProjector(proj_dim=8, proj_seed=1, max_matrix_bytes=3 * 100 * 8 * 4)  # the first 3 chunks
    partial.chunk_rows = 100
    assert torch.equal(partial.project(grads, 0), first)
    partial.project(grads, 0)
    assert partial.chunks_generated == 10 + 7
