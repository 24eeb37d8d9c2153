"""The memory guard: its estimates (written out by hand), batch planning, and refusals through the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dattri_cli import memory, pipeline, runner
from dattri_cli.data import Split
from dattri_cli.errors import ConfigError
from dattri_cli.func import ihvp, projection

GIB = 2**30
RESNET18 = 11_181_642  # parameters of torchvision's resnet18(num_classes=10)


def test_estimates_are_the_documented_products() -> None:
    assert memory.per_sample_grad_bytes(16, RESNET18, 4) == 16 * RESNET18 * 4 * memory.GRAD_WORK_FACTOR
    assert memory.test_side_bytes(32, 1000, 4) == 32 * 1000 * 4 * 2
    assert memory.explicit_hessian_bytes(30_000, 4) == 30_000 * 30_000 * (4 + 24)
    assert memory.arnoldi_bytes(1000, 100) == 101 * 1000 * 8
    # two layers: (in+1, out) = (5, 3) and (4, 2)
    assert memory.kfac_factor_bytes([(5, 3), (4, 2)]) == (25 + 9) * 16 + 15 * 16 + (16 + 4) * 16 + 8 * 16
    assert memory.feature_cache_bytes(256, RESNET18, 2) == 256 * RESNET18 * 4 * 2
    row = RESNET18 * 4 * ihvp.CG_VECTORS_PER_ROW
    # all 32 test rows would be 11 GiB; one chunk holds what fits the solver budget
    chunk = memory.solver_chunk_bytes(32, RESNET18, 4, ihvp.CG_VECTORS_PER_ROW, ihvp.CHUNK_BUDGET_BYTES)
    assert chunk == (ihvp.CHUNK_BUDGET_BYTES // row) * row <= ihvp.CHUNK_BUDGET_BYTES
    assert memory.solver_chunk_bytes(2, 100, 4, 8, ihvp.CHUNK_BUDGET_BYTES) == 2 * 100 * 4 * 8
    assert memory.size(1.5 * GIB) == "1.5 GiB" and memory.size(3 * 2**20) == "3.0 MiB"
    # TRAK's kernel: proj_dim wide, or proj_dim per layer with a Kronecker projection
    assert memory.trak_width(512, "normal", 41) == 512 and memory.trak_width(512, "kronecker", 41) == 41 * 512
    assert memory.trak_kernel_bytes(512) == 3 * 512 * 512 * 4


def test_kronecker_trak_kernel_counts_every_layer() -> None:
    """ResNet-18's 41 layers at 512 per layer: a 21k-wide kernel (2.5 GB for one float32 copy), refused on 4 GiB."""
    sizes = memory.Sizes(RESNET18, 8, 8, 256, 32)
    options = {"proj_dim": 512, "proj_type": "kronecker", "num_layers": 41}
    est = memory.estimate("TRAKAttributor", sizes, options)
    assert est.memory["trak_kernel"] == 3 * (41 * 512) ** 2 * 4
    message = memory.refusal(est, 4 * GIB, "attributor=trak")
    assert message is not None and "projector_kwargs.proj_dim" in message
    dense = memory.estimate("TRAKAttributor", sizes, {**options, "proj_type": "normal"})
    assert dense.memory["trak_kernel"] == 3 * 512**2 * 4


def test_default_batch_sizes_shrink_for_large_models_only() -> None:
    requested = {"train_batch_size": 256, "test_batch_size": 256}
    planned = memory.plan_batch_sizes(RESNET18, requested, 16 * GIB)
    per_sample = RESNET18 * 4 * memory.GRAD_WORK_FACTOR
    for value in planned.values():
        assert value & (value - 1) == 0  # a power of two
        assert value * per_sample <= 16 * GIB * memory.BATCH_FRACTION < 2 * value * per_sample
    assert planned["train_batch_size"] == 32
    # explicit sizes are the user's choice; small models and unknown memory change nothing
    explicit = {"train_batch_size": 100, "test_batch_size": 256}
    assert memory.plan_batch_sizes(RESNET18, explicit, 16 * GIB)["train_batch_size"] == 100
    assert memory.plan_batch_sizes(650, requested, 1 * GIB) == requested  # logistic regression on digits
    assert memory.plan_batch_sizes(RESNET18, requested, None) == requested
    assert memory.plan_batch_sizes(10**12, requested, GIB) == {"train_batch_size": 1, "test_batch_size": 1}


def test_run_yaml_defaults_are_the_guards_defaults() -> None:
    run = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "run.yaml").read_text())
    assert run["loader"] == {
        "train_batch_size": memory.DEFAULT_BATCH_SIZE,
        "test_batch_size": memory.DEFAULT_BATCH_SIZE,
    }
    assert run["memory_guard"] is True


def test_explicit_hessian_refusal_names_the_estimate_and_the_fix() -> None:
    sizes = memory.Sizes(
        num_params=40_000, train_batch_size=256, test_batch_size=256, n_train=455, n_test=114
    )
    est = memory.estimate("IFAttributorExplicit", sizes, budget=12 * GIB)
    assert est.largest() == "explicit_hessian"
    assert est.peak == sum(est.memory.values()) > 40_000**2 * 28
    msg = memory.refusal(est, 12 * GIB, "IFAttributorExplicit on 40,000 parameters")
    assert msg is not None and "\n" not in msg
    assert "needs about 42." in msg and "12.0 GiB is available" in msg
    assert "attributor=if_cg" in msg and "memory_guard=false" in msg
    assert memory.refusal(est, 100 * GIB, "x") is None


def test_per_sample_gradient_refusal_suggests_a_batch_size_that_fits() -> None:
    sizes = memory.Sizes(RESNET18, train_batch_size=200, test_batch_size=8, n_train=256, n_test=8)
    est = memory.estimate("TracInAttributor", sizes, budget=16 * GIB)
    msg = memory.refusal(est, 16 * GIB, "TracIn")
    assert msg is not None and "loader.train_batch_size=32" in msg


def test_feature_cache_disk_refusal() -> None:
    sizes = memory.Sizes(RESNET18, 16, 16, n_train=256, n_test=32)
    est = memory.estimate("BaseInnerProductAttributor", sizes, budget=16 * GIB, feature_cache=True)
    assert est.disk["train_features"] == 256 * RESNET18 * 4
    msg = memory.disk_refusal(est, 5 * GIB, "/cache/features")
    assert msg is not None and "10.7 GiB" in msg and "feature_cache=false" in msg
    assert memory.disk_refusal(est, 100 * GIB, "/cache") is None
    trak = memory.estimate("TRAKAttributor", sizes, {"proj_dim": 512}, feature_cache=True)
    assert trak.disk["train_features"] == 256 * 512 * 4


def test_pipeline_refuses_if_explicit_at_once_and_memory_guard_false_runs(small_run, monkeypatch) -> None:
    monkeypatch.setattr(runner, "available_memory", lambda *_a, **_k: 64 * 2**20)
    cfg = small_run("attributor=if_explicit", "model=mlp", "model.hidden=[64]", "feature_cache=false")
    with pytest.raises(
        ConfigError, match=r"IFAttributorExplicit on 4,810 parameters needs about .*attributor=if_cg"
    ):
        pipeline.run(cfg)
    monkeypatch.setattr(runner, "available_memory", lambda *_a, **_k: 16 * GIB)
    assert pipeline.run(cfg).scores is not None


def test_pipeline_lowers_default_batch_sizes_and_records_them(small_run, monkeypatch) -> None:
    per_sample = 650 * 4 * memory.GRAD_WORK_FACTOR  # logistic regression on digits: 64 x 10 + 10 parameters
    monkeypatch.setattr(
        memory, "RUNTIME_OVERHEAD_BYTES", 0
    )  # a 2 MiB machine: only the batch planning is tested
    monkeypatch.setattr(runner, "available_memory", lambda *_a, **_k: per_sample * 64 * 4)
    adapted = pipeline.run(small_run("loader.train_batch_size=256", out="a.safetensors"))
    assert adapted.metadata["config"]["loader"]["train_batch_size"] == 64
    assert adapted.metadata["config"]["loader"]["test_batch_size"] == 5  # set explicitly: kept
    explicit = pipeline.run(
        small_run("loader.train_batch_size=64", "memory_guard=false", out="b.safetensors")
    )
    assert adapted.scores.numpy().tobytes() == explicit.scores.numpy().tobytes()
    assert adapted.metadata["config_hash"] == explicit.metadata["config_hash"]


# -- the terms checked against measured peaks (scripts/bench_memory_guard.py, docs/benchmarks.md) -----------


class _TokenLM(nn.Module):
    """Embedding -> Linear over positions: ``(T, V)`` logits per sample, like a language model."""

    def __init__(self, vocab: int = 7, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def _split(x: torch.Tensor, y: torch.Tensor) -> Split:
    n = x.shape[0]
    return Split(
        "tiny", x[: n - 2], y[: n - 2], x[n - 2 :], y[n - 2 :], torch.arange(n - 2), torch.arange(n - 2, n)
    )


def test_probe_counts_leaf_outputs_and_model_outputs() -> None:
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    probe = memory.probe_model(mlp, _split(torch.randn(6, 3), torch.randint(0, 2, (6,))))
    assert (probe.activations, probe.outputs, probe.positions) == (4 + 4 + 2, 2, 1)
    assert probe.module_outputs == {"0": 4, "1": 4, "2": 2}
    lm = memory.probe_model(_TokenLM(), _split(torch.randint(0, 7, (6, 9)), torch.randint(0, 7, (6, 9))))
    assert (lm.activations, lm.outputs, lm.positions) == (9 * 5 + 9 * 7, 9 * 7, 9)


def test_probe_changes_nothing_the_run_uses_next() -> None:
    """Batch-norm statistics, the training flag and the random stream are as before the probe."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = _split(torch.randn(6, 3), torch.randint(0, 2, (6,)))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    probe = memory.probe_model(model, split)
    assert probe.activations == 4 + 4 + 4 + 2 and model.training
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a model the probe cannot run (inputs it does not take) leaves the activation terms out
    assert (
        memory.probe_model(nn.Linear(5, 2), _split(torch.randn(6, 3), torch.randint(0, 2, (6,))))
        == memory.Probe()
    )


def test_estimate_terms_are_the_closed_forms_for_a_tiny_model() -> None:
    """A 3-4-2 MLP (26 parameters, 10 activations per sample), batch 8, 5 test rows, every term by hand."""
    p, act, b, n_test = 3 * 4 + 4 + 4 * 2 + 2, 10, 8, 5
    sizes = memory.Sizes(p, b, b, 20, n_test, 4, 1, act, 2, 1)
    gn = memory.estimate("IFAttributorEKFAC", sizes, {"kfac_layers": [(4, 4), (5, 2)]})
    assert gn.memory == {
        "runtime": memory.RUNTIME_OVERHEAD_BYTES,
        "batch_activations": b * act * 4 * memory.BATCH_ACTIVATION_COPIES,
        "train_gradients": b * p * 4 * memory.GRAD_WORK_FACTOR,
        "test_gradients": b * p * 4 * memory.GRAD_WORK_FACTOR,
        "test_side": n_test * p * 4 * memory.TEST_SIDE_COPIES,
        "kfac_factors": ((16 + 16) * 16 + 16 * 16) + ((25 + 4) * 16 + 10 * 16),
        # the exact Gauss-Newton factors: B output Hessians of 2 x 2, held in 4 copies
        "output_hessian": memory.OUTPUT_HESSIAN_COPIES * b * 2 * 2 * 4,
    }
    assert "output_hessian" not in memory.estimate("IFAttributorEKFAC", sizes, {"fisher": "empirical"}).memory
    # with the probe's positions (one per linear layer here) the per-layer captures count:
    # B x sum over layers of positions x (in[+1] + out), in KFAC_CAPTURE_COPIES copies
    captured = memory.estimate(
        "IFAttributorEKFAC", sizes, {"kfac_layers": [(4, 4), (5, 2)], "kfac_positions": [1, 1]}
    )
    assert captured.memory["layer_captures"] == b * ((4 + 4) + (5 + 2)) * 4 * memory.KFAC_CAPTURE_COPIES
    # float64: rotated inputs of both layers, the widest layer's (out, in+1) per-sample gradients and squares
    assert captured.memory["eigen_correction"] == b * ((4 + 5) + 2 * max(4 * 4, 5 * 2)) * 8
    kfac = memory.estimate(
        "IFAttributorKFAC", sizes, {"kfac_layers": [(4, 4), (5, 2)], "kfac_positions": [1, 1]}
    )
    assert "eigen_correction" not in kfac.memory and "layer_captures" in kfac.memory
    # a 3x3 convolution 2 -> 3 channels on 5x5 maps (padding 1): 25 positions of 2 * 9 + 1 inputs and 3 outputs
    assert memory.kfac_capture_bytes(b, [(19, 3, 25)]) == b * 25 * 22 * 4 * memory.KFAC_CAPTURE_COPIES
    explicit = memory.estimate("IFAttributorExplicit", sizes)
    assert explicit.memory["explicit_hessian"] == p * p * (4 + 24)
    assert (
        explicit.memory["hessian_graph"] == p * b * act * 4 * memory.VJP_ACTIVATION_COPIES
    )  # one VJP per parameter
    cg = memory.estimate("IFAttributorCG", sizes)
    assert (
        cg.memory["solver_chunk"] == n_test * p * 4 * ihvp.CG_VECTORS_PER_ROW
    )  # every test row fits one chunk
    assert cg.memory["hvp_graph"] == n_test * b * act * 4 * memory.VJP_ACTIVATION_COPIES
    trak = memory.estimate("TRAKAttributor", sizes, {"proj_dim": 16})
    assert trak.memory["projection_matrix"] == p * 16 * 4  # the whole matrix, under the kept budget
    # the row queue and the zero-padded block of proj_max_batch_size (128) rows
    assert trak.memory["projection_block"] == 2 * 128 * p * 4
    huge = memory.projection_block_bytes(10**8, 128)  # 400 MB a row: one row a block
    assert huge == 2 * 10**8 * 4
    assert (
        "projection_matrix" not in memory.estimate("TRAKAttributor", sizes, {"proj_type": "kronecker"}).memory
    )
    # unknown activations (a model the probe cannot run): those terms are left out, the rest stays
    blind = memory.estimate("IFAttributorCG", memory.Sizes(p, b, b, 20, n_test))
    assert "hvp_graph" not in blind.memory and "batch_activations" not in blind.memory
    assert blind.memory["solver_chunk"] == cg.memory["solver_chunk"]


def test_output_hessian_exact_and_sampled() -> None:
    # a small LM: 16 positions x 200 tokens = 3,200 outputs per sample, batch 8
    exact = memory.output_hessian_bytes(8, 3200, positions=16)
    assert exact == memory.OUTPUT_HESSIAN_COPIES * 8 * 3200**2 * 4  # 1.2 GiB of C x C matrices
    sampled = memory.output_hessian_bytes(8, 3200, positions=16, num_output_samples=4)
    assert sampled == memory.OUTPUT_HESSIAN_COPIES * 8 * 16 * 200**2 * 4  # per-position V x V blocks
    assert sampled * 16 == exact
    # one position (a classifier): sampling still forms the C x C Hessians
    assert memory.output_hessian_bytes(8, 100, 1, num_output_samples=2) == memory.output_hessian_bytes(8, 100)
    # the projection matrix beyond its kept budget: the budget plus the chunk being drawn
    whole = memory.projection_matrix_bytes(10**6, 512, 2**40)
    assert whole == 10**6 * 512 * 4
    assert memory.projection_matrix_bytes(10**6, 512, 2**20) == 2**20 + projection.CHUNK_ELEMENTS * 4


def test_gauss_newton_refusal_names_num_output_samples() -> None:
    sizes = memory.Sizes(200_000, 8, 8, 40, 8, outputs=3200, positions=16)
    est = memory.estimate("IFAttributorEKFAC", sizes, {"kfac_layers": [(65, 64)]})
    assert est.largest() == "output_hessian"
    msg = memory.refusal(est, 1 * GIB, "IFAttributorEKFAC on 200,000 parameters")
    assert msg is not None and "\n" not in msg
    assert "output_hessian 1.2 GiB" in msg and "attributor.num_output_samples=4" in msg
    assert "memory_guard=false" in msg
    sampled = memory.estimate(
        "IFAttributorEKFAC", sizes, {"kfac_layers": [(65, 64)], "num_output_samples": 4}
    )
    assert memory.refusal(sampled, 1 * GIB, "x") is None


def test_run_records_the_estimate_next_to_its_peak(small_run) -> None:
    result = pipeline.run(
        small_run("attributor=if_cg", "attributor.regularization=1.0", "model=mlp", "model.hidden=[8]")
    )
    timings = result.timings
    parts = {k for k in timings if k.startswith("memory_estimate_") and k != "memory_estimate_mib"}
    assert abs(sum(timings[k] for k in parts) - timings["memory_estimate_mib"]) < 1e-6
    assert "memory_estimate_hvp_graph_mib" in parts and "memory_estimate_runtime_mib" in parts
    assert 0 < timings["rss_before_guard_mib"] <= timings["peak_rss_mib"]
