"""EK-FAC / K-FAC attributors against explicit inverse Gauss-Newton influence.

On a single-output linear model with a squared error, the Gauss-Newton matrix is
``2/n X~^T X~`` (``X~`` the inputs with a column of ones) and K-FAC is exact, so
scores must equal ``G_train (GN + damping I)^-1 G_test^T`` with the per-sample
gradients ``2 (f(x) - y) x~`` written by hand.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.influence_function import IFAttributorEKFAC, IFAttributorExplicit, IFAttributorKFAC
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.task import AttributionTask

N_TRAIN, N_TEST, D = 30, 6, 4
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "attributor"


def data(zero_feature: bool = False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=gen, dtype=torch.float64)
    if zero_feature:
        x[:, 1] = 0.0
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.3 * torch.randn(
        N_TRAIN + N_TEST, generator=gen, dtype=torch.float64
    )
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def regression_task(seeds=(0,)):
    model = nn.Linear(D, 1).double()

    def loss(params, batch):
        return ((functional_call(model, params, (batch[0],))[:, 0] - batch[1]) ** 2).mean()

    ckpts = []
    for s in seeds:
        torch.manual_seed(s)
        ckpts.append({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    return AttributionTask(loss, model, ckpts), ckpts


def reference(ckpt, train, test, damping):
    w, b = ckpt["weight"][0], ckpt["bias"][0]

    def grads(ds):
        xt = torch.cat([ds.tensors[0], torch.ones(len(ds), 1, dtype=torch.float64)], dim=1)
        return 2.0 * (ds.tensors[0] @ w + b - ds.tensors[1])[:, None] * xt, xt

    g_train, xt = grads(train)
    g_test, _ = grads(test)
    gn = 2.0 * xt.T @ xt / len(train)
    return g_train @ torch.linalg.solve(gn + damping * torch.eye(D + 1, dtype=torch.float64), g_test.T), gn


def run(attributor, train, test, bs=8):
    attributor.cache(DataLoader(train, batch_size=bs))
    return attributor.attribute(DataLoader(train, batch_size=bs), DataLoader(test, batch_size=4))


@pytest.mark.parametrize("cls", [IFAttributorEKFAC, IFAttributorKFAC])
@pytest.mark.parametrize("fisher", ["gauss_newton", "empirical"])
def test_single_output_linear_equals_explicit_gauss_newton_influence(cls, fisher) -> None:
    train, test = data()
    task, ckpts = regression_task()
    scores = run(cls(task, damping=0.05, fisher=fisher), train, test)
    expected, _ = reference(ckpts[0], train, test, 0.05)
    if fisher == "gauss_newton":
        torch.testing.assert_close(scores, expected)
    else:  # the empirical Fisher weights samples by their squared residual: a different matrix
        assert not torch.allclose(scores, expected, rtol=1e-3)
    # the same sign and scale as the existing attributor (for a linear model H = GN here)
    if fisher == "gauss_newton":
        explicit = run(IFAttributorExplicit(task, regularization=0.05), train, test)
        torch.testing.assert_close(scores, explicit)


def test_auto_damping_is_a_fraction_of_the_mean_eigenvalue_and_recorded() -> None:
    train, test = data()
    task, ckpts = regression_task()
    attributor = IFAttributorEKFAC(task, damping=None, damping_ratio=0.2)
    scores = run(attributor, train, test)
    _, gn = reference(ckpts[0], train, test, 0.0)
    auto = 0.2 * float(torch.linalg.eigvalsh(gn).mean())
    expected, _ = reference(ckpts[0], train, test, auto)
    torch.testing.assert_close(scores, expected)
    layer = attributor.diagnostics["checkpoint_0"]["layers"][""]
    assert layer["damping"] == pytest.approx(auto)
    assert "0.2 x mean eigenvalue" in layer["damping_rule"]
    # the factors are reused when only the damping changes
    factors = attributor.factors
    attributor.damping = 0.05
    again = attributor.attribute(DataLoader(train, batch_size=8), DataLoader(test, batch_size=4))
    assert attributor.factors is factors
    torch.testing.assert_close(again, reference(ckpts[0], train, test, 0.05)[0])


def test_ensemble_averages_checkpoints() -> None:
    train, test = data()
    task, ckpts = regression_task(seeds=(0, 1))
    scores = run(IFAttributorEKFAC(task, damping=0.1), train, test)
    expected = sum(reference(c, train, test, 0.1)[0] for c in ckpts) / 2
    torch.testing.assert_close(scores, expected)


def test_zero_damping_on_singular_curvature_is_refused() -> None:
    train, test = data(zero_feature=True)
    task, _ = regression_task()
    with pytest.raises(NumericalError, match="singular.*damping"):
        run(IFAttributorEKFAC(task), train, test)  # damping 0.0, the reference default
    scores = run(IFAttributorEKFAC(task, damping=None), train, test)
    assert torch.isfinite(scores).all()


def test_conv_net_end_to_end_with_excluded_layer_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LayerNorm(48), nn.Linear(48, 3)
    ).double()

    def loss(params, batch):
        return cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    x = torch.randn(20, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    with pytest.warns(UserWarning, match=r"3\.weight.*3\.bias"):
        attributor = IFAttributorEKFAC(task, damping=None)
    assert attributor.layer_name == ["0.weight", "0.bias", "4.weight", "4.bias"]
    train, test = TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])
    scores = run(attributor, train, test)
    assert scores.shape == (16, 4) and torch.isfinite(scores).all()
    assert attributor.diagnostics["checkpoint_0"]["excluded_parameters"] == ["3.bias", "3.weight"]
    # self-influence through the same transform is positive (a damped PSD inverse)
    assert (attributor.self_attribute(DataLoader(train, batch_size=8)) > 0).all()
    with pytest.raises(ConfigError, match=r"'3'.*LayerNorm"):
        IFAttributorEKFAC(task, module_name=["0", "3"])
    with pytest.raises(ConfigError, match="fisher"):
        IFAttributorEKFAC(task, module_name="0", fisher="sampled")


@pytest.mark.parametrize("name", ["if_ekfac", "if_kfac"])
def test_configs_match_constructor(name: str) -> None:
    node = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    module, cls = node["_target_"].rsplit(".", 1)
    klass = getattr(importlib.import_module(module), cls)
    params = inspect.signature(klass).parameters
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    assert node["_partial_"] is True
    assert set(kwargs) <= set(params) and not {"task", "device"} & set(kwargs)
    train, test = data()
    task, _ = regression_task()
    scores = run(klass(task, device="cpu", **kwargs), train, test)  # the packaged defaults work
    assert torch.isfinite(scores).all()


def test_factors_are_reused_from_the_train_side_cache(small_run):
    """A second run with another damping and another test set reads the factors back."""
    from dattri_cli import pipeline

    first = pipeline.run(
        small_run(
            "attributor=if_ekfac", "feature_cache=true", "model=mlp", "model.hidden=[8]", out="a.safetensors"
        )
    )
    again = pipeline.run(
        small_run(
            "attributor=if_ekfac", "feature_cache=true", "model=mlp", "model.hidden=[8]", out="b.safetensors"
        )
    )
    other = pipeline.run(
        small_run(
            "attributor=if_ekfac",
            "feature_cache=true",
            "model=mlp",
            "model.hidden=[8]",
            "attributor.damping_ratio=0.5",
            "dataset.n_test=7",
            out="c.safetensors",
        )
    )
    assert first.timings["feature_cache_misses"] >= 1
    assert again.timings["feature_cache_hits"] >= 1 and again.timings["feature_cache_misses"] == 0
    assert other.timings["feature_cache_hits"] >= 1 and other.timings["feature_cache_misses"] == 0
    assert first.scores.numpy().tobytes() == again.scores.numpy().tobytes()
    assert not torch.equal(first.scores[:, :7], other.scores)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_tiny_gpt2_ekfac_covers_conv1d_skips_tied_head_and_scores_finite() -> None:
    from dattri_cli.tasks import causal_lm

    model = _tiny_gpt2()
    funcs = causal_lm(model)
    task = AttributionTask(
        funcs.loss_func, model, {k: v.detach().clone() for k, v in model.state_dict().items()}
    )
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randint(0, 50, (6, 8), generator=gen))
    test = TensorDataset(torch.randint(0, 50, (3, 8), generator=gen))
    with pytest.warns(UserWarning, match="transformer.wte.weight"):
        attributor = IFAttributorEKFAC(task, damping=None, num_output_samples=2)
    conv_layers = [n for n in attributor.module_name if ".h." in n]
    assert len(conv_layers) == 8 and "lm_head" not in attributor.module_name
    scores = run(attributor, train, test, bs=3)
    assert scores.shape == (6, 3) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    diag = attributor.diagnostics["checkpoint_0"]
    assert diag["num_output_samples"] == 2 and "transformer.wte.weight" in diag["excluded_parameters"]
    with pytest.raises(ConfigError, match="tied to transformer.wte.weight"):
        IFAttributorEKFAC(task, module_name=["lm_head"])


def test_conv1d_model_scores_equal_linear_model_scores() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    linear = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    conv = nn.Sequential(Conv1D(5, D), nn.Tanh(), Conv1D(3, 5)).double()
    with torch.no_grad():
        for lin, c1d in ((linear[0], conv[0]), (linear[2], conv[2])):
            c1d.weight.copy_(lin.weight.T)
            c1d.bias.copy_(lin.bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=gen)
    train, test = TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    scores = []
    for model in (linear, conv):

        def loss(params, batch, model=model):
            return cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

        task = AttributionTask(loss, model, {k: v.detach().clone() for k, v in model.state_dict().items()})
        scores.append(run(IFAttributorEKFAC(task, damping=0.01), train, test))
    torch.testing.assert_close(scores[1], scores[0])


def test_inplace_relu_resnet_block_scores_equal_out_of_place_twin() -> None:
    from tests.func.test_kfac_networks import _nets

    net, twin = _nets()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(14, 2, 4, 4, generator=gen), torch.randint(0, 3, (14,), generator=gen)
    train, test = TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])
    scores = []
    for model in (net, twin):

        def loss(params, batch, model=model):
            return cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

        task = AttributionTask(loss, model, {k: v.detach().clone() for k, v in model.state_dict().items()})
        with pytest.warns(UserWarning, match="bn1.weight"):  # BatchNorm parameters are left out
            attributor = IFAttributorEKFAC(task, damping=None)
        scores.append(run(attributor, train, test, bs=4))
    assert torch.isfinite(scores[0]).all()
    torch.testing.assert_close(scores[0], scores[1])


def test_resnet_with_one_pixel_maps_scores_finite_with_auto_damping() -> None:
    """ResNet-18's last convolutions see 1x1 maps: most rows of their activation factor are zero."""
    from dattri_cli.func.linalg import zero_rows
    from tests.func.test_linalg import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet().eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 4, 4, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    train, test = TensorDataset(x[:9], y[:9]), TensorDataset(x[9:], y[9:])

    def loss(params, batch):
        return cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    task = AttributionTask(loss, model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    with pytest.warns(UserWarning, match="bn1"):
        attributor = IFAttributorEKFAC(task, damping=None)
    scores = run(attributor, train, test, bs=8)
    assert int(zero_rows(attributor.factors[0]["block2.conv2"].a_cov).sum()) >= 16 * 8  # 8 of 9 taps
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0
    with pytest.warns(UserWarning, match="bn1"):
        undamped = IFAttributorKFAC(task, damping=0.0)
    with pytest.raises(NumericalError, match=r"layer block.\.conv.: the damped curvature is singular"):
        run(undamped, train, test, bs=8)


def test_tiny_bert_classifier_on_dict_batches_with_padding() -> None:
    transformers = pytest.importorskip("transformers")
    from dattri_cli.tasks import classification

    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (9, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0  # padded rows
    labels = torch.randint(0, 3, (9,), generator=gen)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = list(rows)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            i = self.rows[i]
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}

    funcs = classification(model)
    task = AttributionTask(
        funcs.loss_func, model, {k: v.detach().clone() for k, v in model.state_dict().items()}
    )
    with pytest.warns(UserWarning, match="LayerNorm"):
        attributor = IFAttributorEKFAC(task, damping=None)
    train, test = DataLoader(Rows(range(6)), batch_size=3), DataLoader(Rows(range(6, 9)), batch_size=3)
    attributor.cache(train)
    scores = attributor.attribute(train, test)
    assert scores.shape == (6, 3) and torch.isfinite(scores).all()
    assert "classifier" in attributor.module_name
