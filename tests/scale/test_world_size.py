"""torchrun with 1, 2 or 3 gloo processes writes byte-identical score files, for every attributor.

Sums over the training set are folded per loader batch in global batch order
(:class:`dattri_cli.distributed.OrderedSum`), LiSSA and RPS gather the few rows they
need on every rank, and rank spans are whole batches, so how many processes share
the rows changes no bit. 60 rows in batches of 16 give 4 batches: 2 ranks hold 2 + 2,
3 ranks 1 + 1 + 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dattri_cli import distributed, pipeline
from tests.conftest import compose_run
from tests.scale.helpers import free_port, small_overrides

FAST: Dict[str, List[str]] = {
    "grad_dot": ["attributor=grad_dot"],
    "if_cg": [
        "attributor=if_cg",
        "attributor.regularization=0.1",
        "attributor.max_iter=60",
        "attributor.tol=1e-4",
    ],
    "trak": ["attributor=trak", "attributor.projector_kwargs.proj_dim=16"],
}
OTHERS: Dict[str, List[str]] = {
    "grad_cos": ["attributor=grad_cos"],
    "tracin": ["attributor=tracin"],
    "if_explicit": ["attributor=if_explicit", "attributor.regularization=0.01"],
    "if_lissa": [
        "attributor=if_lissa",
        "attributor.recursion_depth=30",
        "attributor.batch_size=8",
        "attributor.scaling=5",
        "attributor.damping=0.02",
    ],
    "if_arnoldi": [
        "attributor=if_arnoldi",
        "attributor.regularization=0.01",
        "attributor.max_iter=20",
        "attributor.proj_dim=10",
    ],
    "if_datainf": ["attributor=if_datainf"],
    "if_ekfac": ["attributor=if_ekfac"],
    "if_kfac": ["attributor=if_kfac"],
    "rps": ["attributor=rps"],
}
GROUPS = {"fast": FAST, "others": OTHERS}


def _rank(rank: int, world: int, port: int, cache: str, work: str, group: str) -> None:
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    for name, overrides in GROUPS[group].items():
        pipeline.run(
            compose_run(small_overrides(Path(cache), Path(work) / f"w{world}_{name}.safetensors") + overrides)
        )
    distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the teardown where gloo's threads can abort a spawned child


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
@pytest.mark.parametrize("group", ["fast", pytest.param("others", marks=pytest.mark.slow)])
def test_one_two_three_ranks_write_the_same_bytes(group, cache_dir, tmp_path):
    for name, overrides in GROUPS[group].items():
        pipeline.run(compose_run(small_overrides(cache_dir, tmp_path / f"w1_{name}.safetensors") + overrides))
    for world in (2, 3):
        mp.spawn(
            _rank, args=(world, free_port(), str(cache_dir), str(tmp_path), group), nprocs=world, join=True
        )
    differ = [
        f"{name} with {world} ranks"
        for name in GROUPS[group]
        for world in (2, 3)
        if (tmp_path / f"w{world}_{name}.safetensors").read_bytes()
        != (tmp_path / f"w1_{name}.safetensors").read_bytes()
    ]
    assert not differ, f"score files differ from one process: {differ}"
