"""The layers backend of TracIn / Grad-Dot / Grad-Cos / TRAK against the torch.func backend on the same task.

Both backends differentiate the same per-sample loss (dattri's convention, with the L2
term of the built-in training loss, which the layers backend carries as a per-layer
offset); scores must agree to float32 rounding.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm import grad_backend
from dattri_cli.algorithm.base import TestSideMemo
from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.errors import ConfigError
from dattri_cli.feature_cache import BlockStore
from dattri_cli.func import kernel
from dattri_cli.func.projection import RandomProjector
from dattri_cli.models.train import correct_probability, make_loss_funcs
from dattri_cli.task import AttributionTask


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    """Conv2d (with and without bias) + eval BatchNorm + LayerNorm + Linear, an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, bias=False)
        self.norm = nn.LayerNorm(3 * 2 * 2)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h)).flatten(1)
        return self.fc(self.norm(h))


class TextNet(nn.Module):
    """Embedding + LayerNorm + a Linear over positions + a pooled classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5)
        self.norm = nn.LayerNorm(5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.norm(self.emb(ids))
        h = h + torch.tanh(self.mix(h))
        return self.head(h.mean(dim=1))


def _inputs(kind: str, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 6, generator=gen)
    if kind == "cnn":
        return torch.randn(n, 2, 5, 5, generator=gen)
    return torch.randint(0, 9, (n, 4), generator=gen)


MODELS = {"mlp": MLP, "cnn": CNN, "text": TextNet}


def _checkpoint(model: nn.Module, seed: int) -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.clone()
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=gen) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=gen) * 0.5
    return state


def _setup(
    kind: str, num_ckpts: int = 1, weight_decay: float = 0.01
) -> Tuple[AttributionTask, nn.Module, tuple]:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    sample_ndim = _inputs(kind, 1, 0).dim() - 1
    loss, target = make_loss_funcs(model, weight_decay, sample_ndim)
    ckpts = [_checkpoint(model, 10 + k) for k in range(num_ckpts)]
    task = AttributionTask(loss, model, ckpts, target_func=target)
    train = (_inputs(kind, 11, 1), torch.randint(0, 3, (11,), generator=torch.Generator().manual_seed(2)))
    test = (_inputs(kind, 5, 3), torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(4)))
    return task, model, (train, test, sample_ndim)


def _loader(data: Tuple[Tensor, Tensor], batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)


def _tracin(kind: str, backend: str, normalized: bool, num_ckpts: int = 1, **kwargs: object) -> Tensor:
    task, _, (train, test, _) = _setup(kind, num_ckpts)
    weights = torch.linspace(0.5, 1.0, num_ckpts)
    attributor = TracInAttributor(task, weights, normalized, grad_backend=backend, **kwargs)
    return attributor.attribute(_loader(train, 4), _loader(test, 3))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "text"])
@pytest.mark.parametrize("normalized", [False, True])
def test_tracin_layers_equal_func(kind: str, normalized: bool) -> None:
    func = _tracin(kind, "func", normalized, num_ckpts=2)
    layers = _tracin(kind, "layers", normalized, num_ckpts=2)
    torch.testing.assert_close(layers, func, rtol=1e-4, atol=1e-5)
    # the scores are not trivially equal: a different checkpoint changes them
    assert not torch.allclose(func, _tracin(kind, "func", normalized, num_ckpts=1), atol=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "text"])
def test_self_influence_layers_equal_func(kind: str) -> None:
    task, _, (train, _, _) = _setup(kind)
    out = {}
    for backend in ("func", "layers"):
        attributor = TracInAttributor(task, [1.0], False, grad_backend=backend)
        out[backend] = attributor.self_attribute(_loader(train, 4))
    torch.testing.assert_close(out["layers"], out["func"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tracin_dense_projection_layers_equal_func(kind: str) -> None:
    """Each layer meets its own rows of the same seeded matrix: the projected scores agree too."""
    proj = {"proj_dim": 16, "proj_seed": 3}
    func = _tracin(kind, "func", False, projector_kwargs=proj)
    layers = _tracin(kind, "layers", False, projector_kwargs=proj)
    torch.testing.assert_close(layers, func, rtol=1e-4, atol=1e-5)


def test_kronecker_with_full_dims_is_exact() -> None:
    """A per-layer budget at least every layer's size makes the Kronecker projection the identity."""
    func = _tracin("cnn", "func", False)
    kron = _tracin("cnn", "layers", False, projector_kwargs={"proj_type": "kronecker", "proj_dim": 10_000})
    torch.testing.assert_close(kron, func, rtol=1e-4, atol=1e-5)


def test_kronecker_needs_the_layers_backend() -> None:
    with pytest.raises(ConfigError, match="kronecker"):
        _tracin("mlp", "func", False, projector_kwargs={"proj_type": "kronecker"})


def test_auto_keeps_torch_func_for_small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    task, _, (train, test, _) = _setup("mlp")
    auto = TracInAttributor(task, [1.0], False, grad_backend="auto")
    func = TracInAttributor(task, [1.0], False, grad_backend="func")
    a = auto.attribute(_loader(train, 4), _loader(test, 3))
    assert auto._layers is None
    assert torch.equal(a, func.attribute(_loader(train, 4), _loader(test, 3)))
    # above the size threshold, the same model goes through the layers
    monkeypatch.setattr(grad_backend, "AUTO_MIN_PARAMS", 10)
    big = TracInAttributor(task, [1.0], False, grad_backend="auto")
    torch.testing.assert_close(big.attribute(_loader(train, 4), _loader(test, 3)), a, rtol=1e-4, atol=1e-5)
    assert big._layers is not None


def test_auto_falls_back_when_the_loss_cannot_be_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-sample term outside the modules' forward passes (here: a penalty on W x) is not an offset."""
    monkeypatch.setattr(grad_backend, "AUTO_MIN_PARAMS", 10)
    task, model, (train, test, _) = _setup("mlp")
    base = task.original_loss_func

    def loss(params: Dict[str, Tensor], batch: tuple) -> Tensor:
        return base(params, batch) + (params["fc1.weight"] @ batch[0]).square().sum()

    odd = AttributionTask(loss, model, task.get_checkpoints(), target_func=task.original_target_func)
    auto = TracInAttributor(odd, [1.0], False, grad_backend="auto")
    func = TracInAttributor(odd, [1.0], False, grad_backend="func")
    expected = func.attribute(_loader(train, 4), _loader(test, 3))
    assert torch.equal(auto.attribute(_loader(train, 4), _loader(test, 3)), expected)
    with pytest.raises(ConfigError, match="outside the modules"):
        TracInAttributor(odd, [1.0], False, grad_backend="layers").attribute(
            _loader(train, 4), _loader(test, 3)
        )


def test_training_batchnorm_is_refused_by_layers() -> None:
    task, model, (train, test, _) = _setup("cnn")
    task.get_param(0)
    model.train()
    with pytest.raises(ConfigError, match="training mode"):
        TracInAttributor(task, [1.0], False, grad_backend="layers").attribute(
            _loader(train, 4), _loader(test, 3)
        )


def test_half_dtype_on_cpu_is_refused_unless_asked() -> None:
    task, _, _ = _setup("mlp")
    with pytest.raises(ConfigError, match="allow_cpu_half"):
        TracInAttributor(task, [1.0], False, dtype="bfloat16")
    TracInAttributor(task, [1.0], False, dtype="bfloat16", allow_cpu_half=True)


def _trak(
    kind: str,
    backend: str,
    projector_kwargs: dict,
    batch_size: int = 4,
    num_ckpts: int = 1,
    regularization: float = 1e-2,
) -> Tensor:
    task, model, (train, test, sample_ndim) = _setup(kind, num_ckpts)
    attributor = TRAKAttributor(
        task,
        correct_probability(model, sample_ndim),
        projector_kwargs=projector_kwargs,
        regularization=regularization,
        grad_backend=backend,
    )
    attributor.cache(_loader(train, batch_size))
    return attributor.attribute(_loader(test, 3))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "text"])
@pytest.mark.parametrize("proj", [{"proj_type": "identity"}, {"proj_dim": 8, "proj_seed": 2}])
def test_trak_layers_equal_func(kind: str, proj: dict) -> None:
    func = _trak(kind, "func", proj, num_ckpts=2)
    layers = _trak(kind, "layers", proj, num_ckpts=2)
    torch.testing.assert_close(layers, func, rtol=1e-3, atol=1e-4)


def test_trak_layers_singular_kernel_through_the_gram_matrix_equals_func(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ridge, 32 dimensions for 11 rows: the layers backend takes the pseudo-inverse from the
    11 x 11 Gram matrix, torch.func's from the 32 x 32 kernel; the scores agree."""
    calls = []
    original = kernel.pseudo_inverse_from_rows
    monkeypatch.setattr(kernel, "pseudo_inverse_from_rows", lambda *a: calls.append(1) or original(*a))
    proj = {"proj_dim": 32, "proj_seed": 2}
    with pytest.warns(RuntimeWarning, match="singular"):
        func = _trak("cnn", "func", proj, num_ckpts=2, regularization=0.0)
    assert not calls
    with pytest.warns(RuntimeWarning, match="singular"):
        layers = _trak("cnn", "layers", proj, num_ckpts=2, regularization=0.0)
    assert len(calls) == 2  # one per checkpoint
    torch.testing.assert_close(layers, func, rtol=1e-3, atol=1e-4)


def test_trak_kronecker_with_full_dims_equals_identity() -> None:
    identity = _trak("cnn", "func", {"proj_type": "identity"})
    kron = _trak("cnn", "layers", {"proj_type": "kronecker", "proj_dim": 10_000})
    torch.testing.assert_close(kron, identity, rtol=1e-3, atol=1e-4)


def _kron_features(batch_size: int, seed: int = 0, ckpt: Optional[int] = None) -> Tensor:
    task, model, (train, _, sample_ndim) = _setup("cnn", num_ckpts=2)
    attributor = TRAKAttributor(
        task,
        correct_probability(model, sample_ndim),
        projector_kwargs={"proj_type": "kronecker", "proj_dim": 6, "proj_seed": seed},
        regularization=1e-2,
        grad_backend="auto",  # a Kronecker projection selects the layers
    )
    attributor.cache(_loader(train, batch_size))
    return attributor.train_side.features[0 if ckpt is None else ckpt].dense()


def test_trak_kronecker_is_seeded_and_batch_size_independent() -> None:
    one = _kron_features(batch_size=4)
    assert one.shape[0] == 11
    # the captures come from batched passes (rounded per batch shape): equal to float32 rounding
    torch.testing.assert_close(_kron_features(batch_size=3), one, rtol=1e-5, atol=1e-7)
    assert torch.equal(one, _kron_features(batch_size=4))
    assert not torch.allclose(one, _kron_features(batch_size=4, seed=1))
    assert not torch.allclose(one, _kron_features(batch_size=4, ckpt=1))  # a matrix per checkpoint


def test_trak_checks_dims_before_any_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """proj_dim above the training rows without a ridge warns before a single training gradient."""
    task, model, (train, _, sample_ndim) = _setup("mlp")
    attributor = TRAKAttributor(task, correct_probability(model, sample_ndim), {"proj_dim": 64})

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a gradient was computed before the check")

    monkeypatch.setattr(attributor, "_train_side", fail)
    with (
        pytest.warns(RuntimeWarning, match="64 projected dimensions for 11 training samples"),
        pytest.raises(AssertionError, match="before the check"),
    ):
        attributor.cache(_loader(train, 4))


def _cached_run(tmp_path, limit_gb: float, projector_kwargs: Optional[dict] = None) -> Tuple[Tensor, int]:
    task, _, (train, test, _) = _setup("mlp")
    attributor = TracInAttributor(
        task,
        [1.0],
        False,
        projector_kwargs=projector_kwargs,
        grad_backend="func",
        feature_cache_max_gb=limit_gb,
    )
    attributor.feature_store = lambda kind, k, extra: BlockStore.keyed(tmp_path, kind, {"ckpt": k, **extra})
    scores = attributor.attribute(_loader(train, 4), _loader(test, 3))
    return scores, len(list(tmp_path.rglob("r*.safetensors")))


def test_feature_cache_skips_unprojected_gradients_over_the_limit(tmp_path, caplog) -> None:
    # 11 rows x 73 parameters x 4 bytes = 3212 bytes
    with caplog.at_level(logging.WARNING, logger="dattri_cli"):
        small, written = _cached_run(tmp_path / "a", limit_gb=3000 / 2**30)
    assert written == 0
    lines = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(lines) == 1 and "feature_cache_max_gb" in lines[0]
    big, written = _cached_run(tmp_path / "b", limit_gb=3300 / 2**30)
    assert written == 3  # one block per training batch
    assert torch.equal(small, big)
    # projected gradients are small: kept whatever the limit
    _, written = _cached_run(tmp_path / "c", limit_gb=1e-9, projector_kwargs={"proj_dim": 4})
    assert written == 3


@pytest.mark.parametrize("buffer_bytes", [0, 2**30])
def test_trak_dense_layers_with_small_chunks_and_groups_equal_func(buffer_bytes: int) -> None:
    """Chunks of 5 matrix rows cut through every layer (and a linear layer's output rows); batches
    are projected alone (buffer 0) or all together: the features equal torch.func's."""
    features = {}
    for backend in ("func", "layers"):
        task, model, (train, _, sample_ndim) = _setup("cnn")
        attributor = TRAKAttributor(
            task,
            correct_probability(model, sample_ndim),
            projector_kwargs={"proj_dim": 8, "proj_seed": 5},
            regularization=1e-2,
            grad_backend=backend,
        )
        attributor.projector.chunk_rows = 5
        attributor.layer_buffer_bytes = buffer_bytes
        attributor.cache(_loader(train, 4))
        features[backend] = attributor.train_side.features[0].dense()
    torch.testing.assert_close(features["layers"], features["func"], rtol=1e-4, atol=1e-6)


def test_layer_name_selecting_whole_modules_works_with_layers() -> None:
    task, _, (train, test, _) = _setup("mlp")
    names = ["fc2.weight", "fc2.bias"]
    out = {}
    for backend in ("func", "layers"):
        attributor = TracInAttributor(task, [1.0], True, layer_name=names, grad_backend=backend)
        out[backend] = attributor.attribute(_loader(train, 4), _loader(test, 3))
    torch.testing.assert_close(out["layers"], out["func"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="only some parameters"):
        TracInAttributor(task, [1.0], False, layer_name=["fc2.weight"], grad_backend="layers").attribute(
            _loader(train, 4), _loader(test, 3)
        )


def test_cli_runs_default_auto_byte_identical_to_func_and_layers_close(small_run) -> None:
    """Through the pipeline: the default (auto) keeps the torch.func numbers on the small MLP; the
    layers backend and a Kronecker TRAK run from the command-line keys."""
    from dattri_cli import pipeline  # noqa: PLC0415 - the whole CLI stack, only for this test

    auto = pipeline.run(small_run("attributor=grad_dot", "feature_cache=false", out="a.safetensors"))
    func = pipeline.run(
        small_run(
            "attributor=grad_dot", "attributor.grad_backend=func", "feature_cache=false", out="f.safetensors"
        )
    )
    layers = pipeline.run(
        small_run(
            "attributor=grad_dot",
            "attributor.grad_backend=layers",
            "feature_cache=false",
            out="l.safetensors",
        )
    )
    assert torch.equal(auto.scores, func.scores)
    torch.testing.assert_close(layers.scores, func.scores, rtol=1e-4, atol=1e-5)
    kron = pipeline.run(
        small_run(
            "attributor=trak",
            "attributor.projector_kwargs.proj_type=kronecker",
            "attributor.projector_kwargs.proj_dim=16",
            "feature_cache=false",
            out="k.safetensors",
        )
    )
    assert kron.scores.shape == func.scores.shape and bool(torch.isfinite(kron.scores).all())


@pytest.mark.parametrize("backend", ["func", "layers"])
def test_bfloat16_projections_stay_close_and_accumulate_in_float32(backend: str) -> None:
    proj = {"proj_dim": 32, "proj_seed": 1}
    exact = _tracin("cnn", backend, False, projector_kwargs=proj)
    half = _tracin("cnn", backend, False, projector_kwargs=proj, dtype="bfloat16", allow_cpu_half=True)
    assert half.dtype == torch.float32
    assert not torch.equal(half, exact)  # the half precision took part
    assert float((half - exact).abs().max() / exact.abs().max()) < 5e-2


@pytest.mark.parametrize("chunk_rows", [5, 64])
def test_dense_group_projection_same_bits_for_any_drawing_threads(chunk_rows: int) -> None:
    """Layer-by-layer projection of a group of batches: chunks drawn by 1, 2 or 4 threads, same bits."""
    task, model, (train, _, _) = _setup("cnn")
    layers = grad_backend.LayerGradients(task, None, "cpu")
    group = [layers.captures(0, (train[0][s : s + 4], train[1][s : s + 4]), target=False) for s in (0, 4, 8)]
    out = {}
    for workers in (1, 2, 4):
        projector = RandomProjector(proj_dim=8, proj_seed=5, max_matrix_mb=0)
        projector.chunk_rows, projector.draw_workers = chunk_rows, workers
        out[workers] = layers.project_dense_group(group, projector, ckpt_idx=1)
        # one draw per chunk for the whole group (a chunk shared by two layers included)
        assert projector.chunks_generated == -(-layers.num_params // chunk_rows)
    for workers in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(out[workers], out[1]))
    # and each batch's features equal the batch projected alone, and the flat gradients projected whole
    alone = RandomProjector(proj_dim=8, proj_seed=5)
    alone.chunk_rows = chunk_rows
    for caps, grouped in zip(group, out[1]):
        assert torch.equal(layers.project_dense(caps, alone, ckpt_idx=1), grouped)
        torch.testing.assert_close(
            grouped, alone.project(layers.flat(caps), ckpt_idx=1), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("normalized", [False, True])
def test_tracin_dense_layers_grouped_equals_batch_by_batch(normalized: bool, tmp_path) -> None:
    """Test and train batches projected in one group per checkpoint: the scores of batch-by-batch
    projection, bit for bit, with one draw of each checkpoint's matrix instead of one per batch."""
    proj = {"proj_dim": 8, "proj_seed": 3, "max_matrix_mb": 0}
    out, draws = {}, {}
    for buffer_bytes in (0, 2**30):
        task, _, (train, test, _) = _setup("cnn", num_ckpts=2)
        attributor = TracInAttributor(
            task, [0.5, 2.0], normalized, projector_kwargs=proj, grad_backend="layers"
        )
        attributor.projector.chunk_rows = 7
        attributor.layer_buffer_bytes = buffer_bytes
        out[buffer_bytes] = (
            attributor.attribute(_loader(train, 4), _loader(test, 3)),
            attributor.self_attribute(_loader(train, 4)),
        )
        draws[buffer_bytes] = attributor.projector.chunks_generated
    assert torch.equal(out[0][0], out[2**30][0]) and torch.equal(out[0][1], out[2**30][1])
    chunks = -(-attributor._layers.num_params // 7)
    # attribute: 2 checkpoints x (2 test + 3 train batches) alone, or 2 x 1 group; self_attribute: 3 vs 1
    assert draws[0] == chunks * (2 * 5 + 2 * 3) and draws[2**30] == chunks * (2 + 2)
    func = _tracin_two("func", normalized)
    torch.testing.assert_close(out[0][0], func, rtol=1e-4, atol=1e-5)
    # a feature store: computed blocks are stored, then read back in place, same scores
    task, _, (train, test, _) = _setup("cnn", num_ckpts=2)
    for run in range(2):
        attributor = TracInAttributor(
            task, [0.5, 2.0], normalized, projector_kwargs=proj, grad_backend="layers"
        )
        attributor.projector.chunk_rows = 7
        attributor.feature_store = lambda kind, k, extra: BlockStore.keyed(
            tmp_path, kind, {"ckpt": k, **extra}
        )
        assert torch.equal(attributor.attribute(_loader(train, 4), _loader(test, 3)), out[0][0])
        if run == 1:  # only the test side was projected: the training blocks were read
            assert attributor.projector.chunks_generated == chunks * 2


def _tracin_two(backend: str, normalized: bool) -> Tensor:
    task, _, (train, test, _) = _setup("cnn", num_ckpts=2)
    proj = {"proj_dim": 8, "proj_seed": 3}
    attributor = TracInAttributor(task, [0.5, 2.0], normalized, projector_kwargs=proj, grad_backend=backend)
    attributor.projector.chunk_rows = 7
    return attributor.attribute(_loader(train, 4), _loader(test, 3))


def test_tracin_dense_layers_grouped_remembers_the_test_side() -> None:
    """With a test-side memo (the runner's row blocks), a second block reuses the test features."""
    task, _, (train, test, _) = _setup("cnn", num_ckpts=2)
    proj = {"proj_dim": 8, "proj_seed": 3}
    attributor = TracInAttributor(task, [0.5, 2.0], False, projector_kwargs=proj, grad_backend="layers")
    attributor.test_side_memo = TestSideMemo()
    test_loader = _loader(test, 3)
    first = attributor.attribute(_loader(train, 4), test_loader)
    assert len(attributor.test_side_memo) == 2  # one per checkpoint
    calls = []
    captures = attributor._layers.captures
    attributor._layers.captures = lambda k, b, target: calls.append(target) or captures(k, b, target)
    second = attributor.attribute(_loader(train, 4), test_loader)
    assert torch.equal(first, second)
    assert calls and not any(calls)  # training batches only
