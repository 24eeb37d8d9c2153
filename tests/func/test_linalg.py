"""robust_eigh: the plain result when eigh works, a correct one when it fails, an error only for NaN/Inf.

LAPACK's non-convergence cannot be provoked deterministically on this CPU build, so
``torch.linalg.eigh`` is replaced by a stand-in that raises like it does (the
``torch._C._LinAlgError`` "failed to converge") for the inputs the real one rejects
on other machines: float32 matrices, or any matrix without enough jitter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.errors import NumericalError
from dattri_cli.func import kfac, linalg

REAL_EIGH = torch.linalg.eigh


def psd(n: int, rank: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return (x @ x.T / rank).to(dtype)


def with_zero_rows(mat: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    out = mat.clone()
    out[dead] = 0.0
    out[:, dead] = 0.0
    return out


def check_decomposition(mat: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, atol: float) -> None:
    n = mat.shape[0]
    assert evals.dtype == mat.dtype and evecs.dtype == mat.dtype
    assert (evals[1:] >= evals[:-1]).all()
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(n, dtype=mat.dtype), atol=atol, rtol=0)
    torch.testing.assert_close((evecs * evals) @ evecs.T, mat, atol=atol * float(mat.abs().max()), rtol=0)


def failing_eigh(min_jitter: float = 0.0, fail_float32: bool = True, fail_zero_rows: bool = False):
    """An eigh that 'fails to converge' once, then on float32, below a smallest eigenvalue or on zero rows."""
    calls = []

    def eigh(mat: torch.Tensor, *args, **kwargs):
        if mat.dim() != 2:  # batched calls (K-FAC's output Hessians) are not factors
            return REAL_EIGH(mat, *args, **kwargs)
        calls.append(mat)
        if (fail_float32 and mat.dtype == torch.float32) or len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        if fail_zero_rows and bool(linalg.zero_rows(mat).any()):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        if min_jitter and float(REAL_EIGH(mat)[0].min()) < min_jitter:  # 'too ill-conditioned'
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return REAL_EIGH(mat, *args, **kwargs)

    return eigh, calls


def test_plain_eigh_result_is_kept_bit_for_bit():
    for dtype in (torch.float32, torch.float64):
        mat = psd(40, 60, dtype=dtype)
        mat[3, 5] += 1e-7  # not exactly symmetric: eigh reads one triangle, so must we
        evals, evecs = linalg.robust_eigh(mat)
        ref = REAL_EIGH(mat)
        assert torch.equal(evals, ref[0]) and torch.equal(evecs, ref[1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_is_a_clear_error(value):
    mat = psd(6, 6)
    mat[2, 4] = value
    with pytest.raises(NumericalError, match="layer fc A holds 1 NaN/Inf entries"):
        linalg.robust_eigh(mat, "layer fc A")


def test_failure_climbs_to_float64(monkeypatch):
    mat = psd(30, 50, dtype=torch.float32)
    eigh, calls = failing_eigh()
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with pytest.warns(UserWarning, match="eigh failed on the torch.float32 factor"):
        evals, evecs = linalg.robust_eigh(mat, "A")
    assert calls[-1].dtype == torch.float64 and len(calls) == 2
    check_decomposition(mat, evals, evecs, atol=1e-5)


def test_jitter_is_subtracted_from_the_eigenvalues(monkeypatch):
    mat = psd(25, 5)  # rank 5: twenty zero eigenvalues
    scale = float(mat.diagonal().abs().mean())
    eigh, calls = failing_eigh(min_jitter=1e-7 * scale, fail_float32=False)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with pytest.warns(UserWarning, match="jitter 1e-06"):
        evals, evecs = linalg.robust_eigh(mat)
    check_decomposition(mat, evals, evecs, atol=1e-9)
    assert evals[:20].abs().max() < 1e-9 * scale


def test_zero_rows_are_split_off(monkeypatch):
    """A factor like ResNet-18's last convolutions: most rows of the activation factor are zero."""
    n = 288
    dead = torch.ones(n, dtype=torch.bool)
    dead[torch.arange(4, n, 9)] = False  # the centre tap of each 3x3 patch is the only nonzero one
    mat = with_zero_rows(psd(n, 100, seed=1), dead)
    assert int(linalg.zero_rows(mat).sum()) == n - 32
    eigh, calls = failing_eigh(fail_float32=False)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with pytest.warns(UserWarning, match="256 zero rows split off"):
        evals, evecs = linalg.robust_eigh(mat)
    assert calls[-1].shape == (32, 32)  # only the live block was decomposed
    check_decomposition(mat, evals, evecs, atol=1e-10)
    zero_cols = evecs[:, evals == 0]
    assert zero_cols.shape[1] >= 256
    assert (zero_cols[~dead] == 0).all()  # the zero eigenvectors of dead rows are unit vectors e_k


def test_large_factor_with_zero_rows_skips_the_plain_call(monkeypatch):
    """At SPLIT_MIN_DIM and above, zero rows are split off before any eigh: same reconstruction, no warning."""
    n = linalg.SPLIT_MIN_DIM + 7
    dead = torch.ones(n, dtype=torch.bool)
    dead[torch.arange(4, n, 9)] = False
    mat = with_zero_rows(psd(n, 150, seed=2), dead)
    live = int((~dead).sum())
    calls = []

    def eigh(m, *args, **kwargs):
        calls.append(tuple(m.shape))
        return REAL_EIGH(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evals, evecs = linalg.robust_eigh(mat, "A")
    assert calls == [(live, live)]  # the full matrix was never handed to eigh
    check_decomposition(mat, evals, evecs, atol=1e-10)
    ref = REAL_EIGH(mat)[0]
    torch.testing.assert_close(evals, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
    # below the threshold the plain call is kept, bit for bit
    small = with_zero_rows(psd(50, 20), torch.arange(50) % 3 == 0)
    calls.clear()
    got = linalg.robust_eigh(small)
    assert calls == [(50, 50)]
    assert torch.equal(got[1], REAL_EIGH(small)[1])


def test_all_zero_factor(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh(fail_float32=False)[0])
    with pytest.warns(UserWarning):
        evals, evecs = linalg.robust_eigh(torch.zeros(5, 5))
    assert torch.equal(evals, torch.zeros(5)) and torch.equal(evecs @ evecs.T, torch.eye(5))


class BasicBlock(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN plus a 1x1 projection shortcut), written by hand."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = BasicBlock(8, 8, 2)  # 4x4 -> 2x2
        self.block2 = BasicBlock(8, 16, 2)  # 2x2 -> 1x1: 3x3 convolutions see one real pixel
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


def test_resnet_block_factors_decompose_even_when_eigh_fails(monkeypatch):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 4, 4, generator=g), torch.randint(0, 4, (24,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, batch: tuple) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    names = kfac.select_layers(model).modules
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    plain, _ = kfac.fit_factors(loss, params, loader, model, names)
    for name in names:  # eigh converged: fit_factors' decompositions are exactly the plain ones
        assert torch.equal(plain[name].a_evecs, REAL_EIGH(plain[name].a_cov)[1])
        assert torch.equal(plain[name].s_evals, REAL_EIGH(plain[name].s_cov)[0])
    a_cov = plain["block2.conv2"].a_cov
    dead = linalg.zero_rows(a_cov)
    assert int(dead.sum()) == 16 * 8  # 8 of the 9 taps read padding at a 1x1 map
    assert int(linalg.zero_rows(plain["block2.conv1"].a_cov).sum()) > 0

    # every factor with zero rows 'fails to converge', as ResNet-18's did
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh(fail_float32=False, fail_zero_rows=True)[0])
    with pytest.warns(UserWarning, match="A of layer block2.conv2: .* 128 zero rows split off"):
        robust, _ = kfac.fit_factors(loss, params, loader, model, names, correct=False)
    f = robust["block2.conv2"]
    check_decomposition(f.a_cov, f.a_evals, f.a_evecs, atol=1e-10)
    torch.testing.assert_close(f.a_evals, plain["block2.conv2"].a_evals, atol=1e-12, rtol=0)
    for name in names:  # every factor of every layer came back finite
        assert torch.isfinite(robust[name].a_evecs).all() and torch.isfinite(robust[name].s_evecs).all()


def test_kfac_reports_a_nan_factor_by_layer():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, batch: tuple) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

    with pytest.raises(NumericalError, match="activation factor A of layer 0 holds .* NaN/Inf"):
        kfac.fit_factors(loss, params, [(x, y)], model, ["0"])
