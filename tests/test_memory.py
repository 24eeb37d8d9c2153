"""The memory guard: its estimates (written out by hand), batch planning, and refusals through the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dattri_cli import memory, pipeline, runner
from dattri_cli.errors import ConfigError
from dattri_cli.func import ihvp

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
    monkeypatch.setattr(runner, "available_memory", lambda *_a, **_k: per_sample * 64 * 4)
    adapted = pipeline.run(small_run("loader.train_batch_size=256", out="a.safetensors"))
    assert adapted.metadata["config"]["loader"]["train_batch_size"] == 64
    assert adapted.metadata["config"]["loader"]["test_batch_size"] == 5  # set explicitly: kept
    explicit = pipeline.run(
        small_run("loader.train_batch_size=64", "memory_guard=false", out="b.safetensors")
    )
    assert adapted.scores.numpy().tobytes() == explicit.scores.numpy().tobytes()
    assert adapted.metadata["config_hash"] == explicit.metadata["config_hash"]
