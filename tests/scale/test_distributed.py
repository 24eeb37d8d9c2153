"""Two gloo processes (torch.distributed, 127.0.0.1 only) give the single-process scores, bit for bit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dattri_cli import distributed, pipeline
from dattri_cli.io import load_scores
from tests.conftest import compose_run
from tests.scale.helpers import free_port, small_overrides

CASES = {
    "grad_dot": ["attributor=grad_dot"],
    "if_cg": [
        "attributor=if_cg",
        "attributor.regularization=0.1",
        "attributor.max_iter=60",
        "attributor.tol=1e-4",
    ],
    # minibatches of 8 from 60 rows split 32 / 28: most draw rows of both ranks
    "if_lissa": [
        "attributor=if_lissa",
        "attributor.recursion_depth=30",
        "attributor.batch_size=8",
        "attributor.scaling=5",
        "attributor.damping=0.02",
    ],
    "trak": ["attributor=trak", "attributor.projector_kwargs.proj_dim=16"],
    "if_datainf": ["attributor=if_datainf"],
    "if_ekfac": ["attributor=if_ekfac"],
    "rps": ["attributor=rps"],  # the final-layer fit sums over both ranks' rows
}


def _rank(rank: int, port: int, cache: str, work: str) -> None:
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    for name, overrides in CASES.items():
        pipeline.run(
            compose_run(small_overrides(Path(cache), Path(work) / f"dist_{name}.safetensors") + overrides)
        )
    distributed.shutdown()
    # the results are on disk; skip the interpreter's teardown, where gloo's threads can
    # still abort a spawned child ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
def test_two_gloo_ranks_equal_one_process(cache_dir, tmp_path):
    single = {
        name: pipeline.run(compose_run(small_overrides(cache_dir, tmp_path / f"one_{name}.safetensors") + o))
        for name, o in CASES.items()
    }
    mp.spawn(_rank, args=(free_port(), str(cache_dir), str(tmp_path)), nprocs=2, join=True)
    for name, one in single.items():
        tensors, meta = load_scores(tmp_path / f"dist_{name}.safetensors")
        assert meta["config_hash"] == one.metadata["config_hash"]
        assert torch.equal(tensors["train_indices"], load_scores(one.path)[0]["train_indices"])
        # sums over the training set are folded in global batch order: the same bits
        assert torch.equal(tensors["scores"], one.scores), name
