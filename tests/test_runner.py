"""runner: row plans and the execution of a run through the attributor contract only."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from torch.utils.data import DataLoader

from dattri_cli import runner
from dattri_cli.algorithm.base import Attributor, TrainRows
from dattri_cli.data import digits
from dattri_cli.errors import ConfigError


class Recording(Attributor):
    """Scores row i, test j as ``i + j / 100``; records the contract calls it gets."""

    keeps_test_side = True

    def __init__(self) -> None:
        self._init_hooks()
        self.calls: List[Tuple] = []

    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:
        self.calls.append(("prepare", len(train_dataloader.dataset), row_offset))

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> torch.Tensor:
        self.calls.append(("score_rows", rows.start, rows.stop, self.test_side_memo is not None))
        assert len(rows.loader.dataset) == rows.stop - rows.start
        n_test = len(test_dataloader.dataset)
        return torch.arange(rows.start, rows.stop, dtype=torch.float64)[:, None] + torch.arange(n_test) / 100


SPLIT = digits(40, 3)


def _run(plan: runner.RowPlan, blocks: List[runner.RowPlan]):
    attributor = Recording()
    timings = {}
    out = list(runner.score_blocks(attributor, SPLIT, SPLIT.loaders(10, 2), plan, blocks, timings))
    return attributor, out, timings


def test_block_rows_are_whole_batches():
    assert runner.block_rows(95, 10, 0, 3) == (0, 30)
    assert runner.block_rows(95, 10, 2, 3) == (60, 95)
    with pytest.raises(ConfigError, match="only 10 training batches"):
        runner.block_rows(95, 10, 0, 11)


def test_plans_for_a_full_run_a_shard_and_a_rank():
    assert runner.plan_rows({}, 40, 10).mode == "full"
    shard = runner.plan_rows({"index": 1, "count": 2}, 40, 10)
    assert (shard.mode, shard.start, shard.stop) == ("shard", 20, 40)
    rank = runner.plan_rows({}, 40, 10, rank=1, world=4)
    assert (rank.mode, rank.start, rank.stop) == ("rank", 10, 20)
    with pytest.raises(ConfigError, match="shard.index must be one of 0..1"):
        runner.plan_rows({"index": 2, "count": 2}, 40, 10)


def test_one_file_prepares_on_the_full_set_and_scores_every_row():
    plan = runner.RowPlan(0, 1, 0, 40, 40, "full")
    attributor, out, timings = _run(plan, [plan])
    assert attributor.calls == [("prepare", 40, 0), ("score_rows", 0, 40, False)]
    ((block, scores),) = out
    assert block is plan and scores.dtype == torch.float32 and scores.shape == (40, 3)
    assert {"cache_s", "attribute_s"} <= set(timings)


def test_row_blocks_prepare_once_and_keep_the_test_side_while_scoring():
    plan = runner.RowPlan(0, 1, 0, 40, 40, "full")
    blocks = runner.plan_files(20, plan, 10, 3, 12, None)
    attributor, out, _ = _run(plan, blocks)
    assert attributor.calls == [("prepare", 40, 0), ("score_rows", 0, 20, True), ("score_rows", 20, 40, True)]
    assert torch.equal(torch.cat([s for _, s in out]), torch.arange(40.0)[:, None] + torch.arange(3) / 100)
    assert attributor.test_side_memo is None  # dropped afterwards


def test_a_shard_prepares_on_the_full_set_and_scores_its_rows():
    plan = runner.RowPlan(1, 2, 20, 40, 40, "shard")
    attributor, out, _ = _run(plan, [plan])
    assert attributor.calls == [("prepare", 40, 0), ("score_rows", 20, 40, False)]


def test_ranks_are_refused_unless_the_class_declares_it():
    plan = runner.RowPlan(1, 2, 20, 40, 40, "rank")
    with pytest.raises(ConfigError, match="Recording does not support torchrun"):
        _run(plan, [plan])
    Recording.splits_over_ranks = True
    try:
        attributor, _, _ = _run(plan, [plan])
    finally:
        Recording.splits_over_ranks = False
    assert attributor.calls == [("prepare", 20, 20), ("score_rows", 20, 40, False)]


def test_memory_estimate_reads_the_declared_accumulator():
    attributor = Recording()
    assert runner.score_bytes(attributor, torch.float32) == runner.OUTPUT_BYTES_PER_SCORE + 4
    Recording.accumulator_dtype = torch.float64
    try:
        assert runner.score_bytes(attributor, torch.float32) == runner.OUTPUT_BYTES_PER_SCORE + 8
    finally:
        Recording.accumulator_dtype = None
