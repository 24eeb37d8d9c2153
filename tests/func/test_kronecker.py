"""Kronecker projection: equal to the dense projection by ``P_out (x) P_in``, seeded, batch independent."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.functional import cross_entropy

from dattri_cli.errors import ConfigError
from dattri_cli.func import kronecker as kr
from dattri_cli.func import layer_grads as lg

pytestmark = pytest.mark.usefixtures("float64_default")


def per_sample_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return cross_entropy(model(batch[0]), batch[1], reduction="none")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 6)
        self.conv = nn.Conv2d(1, 7, 3, padding=1)
        self.fc = nn.Linear(7 * 4 * 4 + 6, 9)
        self.norm = nn.LayerNorm(9)
        self.out = nn.Linear(9, 3, bias=False)

    def forward(self, batch: tuple) -> torch.Tensor:
        img, ids = batch
        h = torch.relu(self.conv(img)).flatten(1)
        e = self.emb(ids).mean(dim=1)
        return self.out(self.norm(torch.tanh(self.fc(torch.cat([h, e], dim=1)))))


def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return cross_entropy(model(batch[:2]), batch[2], reduction="none")


def make_batch(n: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 4, 4, generator=g),
        torch.randint(0, 40, (n, 5), generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )


def reference_matrices(model: nn.Module, batch: tuple) -> dict:
    """Per-sample gradient of each factored layer as its ``(out, in[+1])`` matrix (embedding: ``(dim, rows)``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict, img: torch.Tensor, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, ((img[None], ids[None]),))
        return cross_entropy(out, y[None])

    g = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, *batch)
    n = batch[0].shape[0]
    return {
        "emb": g["emb.weight"].transpose(1, 2),
        "conv": torch.cat([g["conv.weight"].reshape(n, 7, -1), g["conv.bias"][:, :, None]], dim=2),
        "fc": torch.cat([g["fc.weight"], g["fc.bias"][:, :, None]], dim=2),
        "out": g["out.weight"],
        "norm": torch.cat([g["norm.weight"], g["norm.bias"]], dim=1),
    }


def dense(mat: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.eye(size) if mat is None else mat


@pytest.mark.parametrize("proj_dim", [16, 30, 4096])
def test_factored_equals_dense_kronecker_projection(proj_dim):
    torch.manual_seed(0)
    model, batch = Net(), make_batch(6)
    ref = reference_matrices(model, batch)
    caps = lg.capture(model, loss, batch)
    proj = kr.KroneckerProjector(proj_dim=proj_dim, seed=3)
    projected = {name: proj.project_layer(cap, ckpt_idx=1) for name, cap in caps.items()}
    for name in ("emb", "conv", "fc", "out"):
        cap = caps[name]
        p_in, p_out = proj.matrices(cap, 1, ref[name])
        size_in, size_out = kr.layer_sizes(cap)
        k_in, k_out = proj.layer_dims(cap)
        assert k_in * k_out <= proj_dim
        kron = torch.kron(dense(p_out, size_out), dense(p_in, size_in))
        assert kron.shape == (k_out * k_in, size_out * size_in)
        expected = ref[name].reshape(ref[name].shape[0], -1) @ kron.T
        torch.testing.assert_close(projected[name], expected, msg=name)
        # a side that fits its k is the identity (exact), never projected up
        assert (p_in is None) == (k_in == size_in) and (p_out is None) == (k_out == size_out)
    if proj_dim == 4096:
        assert kr.KroneckerProjector(4096).matrices(caps["out"], 1, ref["out"]) == (None, None)
    (p,) = proj.matrices(caps["norm"], 1, ref["norm"])
    torch.testing.assert_close(projected["norm"], ref["norm"] @ dense(p, 18).T)
    full = proj.project(caps, ckpt_idx=1)
    assert full.shape[1] == sum(v.shape[1] for v in projected.values())


def test_batch_size_and_order_do_not_change_a_sample_bit_for_bit():
    torch.manual_seed(1)
    model = Net().float()
    batch = make_batch(10)
    batch = (batch[0].float(), batch[1], batch[2])
    caps = lg.capture(model, loss, batch)
    proj = kr.KroneckerProjector(proj_dim=20, seed=5)
    for name, cap in caps.items():
        if cap.kind not in (lg.LINEAR, lg.EMBEDDING):
            continue
        a, d = cap.factors()
        p_in, p_out = proj.matrices(cap, 0, d)
        num = cap.module.weight.shape[0] if cap.kind == lg.EMBEDDING else None
        whole = kr.project_factors(a, d, p_in, p_out, num)
        order = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
        parts = [order[:1], order[1:4], order[4:]]
        # a fresh projector: the same matrices from the seed alone
        fresh_in, fresh_out = kr.KroneckerProjector(proj_dim=20, seed=5).matrices(cap, 0, d)
        for idx in parts:
            got = kr.project_factors(a[idx], d[idx], fresh_in, fresh_out, num)
            assert torch.equal(got, whole[idx]), name
        batched = kr.project_factors(a, d, p_in, p_out, num, deterministic=False)
        torch.testing.assert_close(batched, whole)
    # end to end, separate forward/backward passes per group agree (to rounding of the passes themselves)
    first = proj.project(lg.capture(model, loss, tuple(x[:4] for x in batch)))
    torch.testing.assert_close(first, proj.project(caps)[:4])


def test_seeds_select_different_matrices():
    a = kr.gaussian_matrix(4, 10, seed=0, ckpt_idx=0, layer="fc", side="in")
    assert torch.equal(a, kr.gaussian_matrix(4, 10, seed=0, ckpt_idx=0, layer="fc", side="in"))
    for other in [
        kr.gaussian_matrix(4, 10, seed=1, ckpt_idx=0, layer="fc", side="in"),
        kr.gaussian_matrix(4, 10, seed=0, ckpt_idx=1, layer="fc", side="in"),
        kr.gaussian_matrix(4, 10, seed=0, ckpt_idx=0, layer="fc2", side="in"),
        kr.gaussian_matrix(4, 10, seed=0, ckpt_idx=0, layer="fc", side="out"),
    ]:
        assert not torch.equal(a, other)
    assert kr.gaussian_matrix(10, 10, 0, 0, "fc", "in") is None  # never projected up
    assert kr.gaussian_matrix(4, 10, 0, 0, "fc", "in", dtype=torch.float64).dtype == torch.float64


def test_dimension_rule():
    assert kr.kronecker_dims(513, 256, 4096) == (64, 64)
    assert kr.kronecker_dims(10, 256, 4096) == (10, 256)  # a narrow side is kept whole
    assert kr.kronecker_dims(1000, 3, 4096) == (1000, 3)  # a narrow output side: the input side gets the rest
    assert kr.kronecker_dims(65, 10, 512) == (51, 10)
    assert kr.kronecker_dims(100, 100, 30) == (5, 6)
    with pytest.raises(ConfigError):
        kr.kronecker_dims(10, 10, 0)


def test_inner_products_preserved_in_expectation():
    """JL-style: norms within 30% for one seed, the mean over seeds of the inner products close."""
    g = torch.Generator().manual_seed(0)
    n, t, d_in, d_out = 6, 3, 200, 150
    a = torch.randn(n, t, d_in, generator=g)
    d = torch.randn(n, t, d_out, generator=g)
    full = torch.einsum("bto,bti->boi", d, a).reshape(n, -1)
    gram = full @ full.T
    estimates = []
    for seed in range(40):
        p_in = kr.gaussian_matrix(32, d_in, seed, 0, "l", "in", torch.float64)
        p_out = kr.gaussian_matrix(32, d_out, seed, 0, "l", "out", torch.float64)
        proj = kr.project_factors(a, d, p_in, p_out)
        estimates.append(proj @ proj.T)
        if seed == 0:
            ratio = proj.norm(dim=1) / full.norm(dim=1)
            assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio
    mean = torch.stack(estimates).mean(dim=0)
    scale = torch.outer(full.norm(dim=1), full.norm(dim=1))
    assert ((mean - gram).abs() / scale).max() < 0.15
    assert ((estimates[0] - gram).abs() / scale).max() > 1e-3  # a projection, not the identity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_uses_the_cpu_matrices_and_agrees():
    torch.manual_seed(2)
    model, batch = Net(), make_batch(5)
    proj = kr.KroneckerProjector(proj_dim=20, seed=1)
    cpu = proj.project(lg.capture(model, loss, batch))
    gpu_batch = tuple(x.cuda() for x in batch)
    gpu = proj.project(lg.capture(model.cuda(), loss, gpu_batch))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


class Convs(nn.Module):
    """Convolutions of every shape the batched projection handles by a convolution, one used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.dil = nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=False)
        self.shared = nn.Conv2d(5, 5, 1)  # applied twice
        self.narrow = nn.Conv2d(5, 1, 1, bias=False)  # 5 x 1 fits 9 dimensions: the identity on both sides
        self.fc = nn.Linear(3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dil(torch.tanh(self.stem(x))))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.fc(self.narrow(h).flatten(1))


def test_batched_convolutions_are_projected_by_a_convolution_and_equal_the_dense_kronecker():
    """``deterministic=False`` projects a convolution's input side by a convolution (no unfolding):
    equal to ``(P_out (x) P_in) vec(G)`` with ``G`` torch.func's per-sample gradient."""
    torch.manual_seed(0)
    model = Convs()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
    caps = lg.capture(model, lambda m, b: cross_entropy(m(b[0]), b[1], reduction="none"), batch)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, *batch)
    proj = kr.KroneckerProjector(proj_dim=9, seed=2, deterministic=False)
    for name in ("stem", "dil", "shared", "narrow"):
        cap = caps[name]
        assert kr._convolution_projectable(cap)
        w = grads[f"{name}.weight"].reshape(5, cap.module.out_channels, -1)
        if cap.module.bias is not None:
            w = torch.cat([w, grads[f"{name}.bias"][:, :, None]], dim=2)
        p_in, p_out = proj.matrices(cap, 0, w)
        size_in, size_out = kr.layer_sizes(cap)
        assert (p_in is None) == (name == "narrow")
        kron = torch.kron(dense(p_out, size_out), dense(p_in, size_in))
        expected = w.reshape(5, -1) @ kron.T
        torch.testing.assert_close(proj.project_layer(cap, 0), expected, msg=name)
        # the one-sample-at-a-time (unfolding) path agrees
        unfolded = kr.KroneckerProjector(proj_dim=9, seed=2, deterministic=True).project_layer(cap, 0)
        torch.testing.assert_close(proj.project_layer(cap, 0), unfolded, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_unfold_equals_f_unfold_bit_for_bit(channels_last: bool):
    g = torch.Generator().manual_seed(0)
    for shape, k, d, p, s in [
        ((3, 2, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
        ((2, 3, 9, 9), (3, 2), (2, 1), (2, 0), (2, 3)),
        ((4, 5, 4, 4), (1, 1), (1, 1), (0, 0), (2, 2)),
        ((1, 2, 8, 8), (7, 7), (1, 1), (3, 3), (2, 2)),
    ]:
        x = torch.randn(*shape, generator=g)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        expected = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)
        conv = torch.nn.Conv2d(shape[1], 1, k, stride=s, padding=p, dilation=d)
        got = lg.unfold_patches(conv, x)
        assert got.shape == expected.shape and torch.equal(got, expected)
