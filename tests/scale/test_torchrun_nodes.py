"""The documented multi-node command, run as two single-process "nodes" on 127.0.0.1.

``torchrun --nnodes=2 --node_rank=i ...`` is how a cluster launches dattri-cli; here
both nodes are local processes that meet through a static rendezvous, which exercises
the same launcher path (environment variables, process group, rank-0 writing) as two
machines would, over gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dattri_cli import pipeline
from dattri_cli.io import load_scores
from tests.conftest import compose_run
from tests.scale.helpers import free_port

OVERRIDES = [
    "attributor=if_cg",
    "attributor.regularization=0.1",
    "attributor.max_iter=40",
    "attributor.tol=1e-4",
    "dataset.n_train=60",
    "dataset.n_test=12",
    "train.epochs=3",
    "loader.train_batch_size=16",
    "loader.test_batch_size=5",
    "progress=off",
]


def _node(rank: int, port: int, cache: Path, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node_rank={rank}",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "dattri_cli",
        "run",
        *OVERRIDES,
        f"cache_dir={cache}",
        f"out={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
def test_two_nodes_on_localhost_equal_one_process(cache_dir, tmp_path):
    one = pipeline.run(
        compose_run([*OVERRIDES, f"cache_dir={cache_dir}", f"out={tmp_path / 'one.safetensors'}"])
    )
    out = tmp_path / "nodes" / "scores.safetensors"
    port = free_port()
    nodes = [_node(rank, port, cache_dir, out) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    tensors, meta = load_scores(out)
    assert meta["config_hash"] == one.metadata["config_hash"]
    torch.testing.assert_close(
        tensors["scores"], one.scores, rtol=1e-3, atol=1e-5 * float(one.scores.abs().max())
    )
