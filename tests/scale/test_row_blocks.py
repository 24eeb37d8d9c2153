"""One `dattri run` writing its rows as several files (output.rows_per_file).

Merged, the files equal the single-file run byte for byte; each is the shard file of
its index; the test side is computed once per checkpoint; `auto` splits only when
memory is short; bad values are one-line errors.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from dattri_cli import pipeline, runner, summary
from dattri_cli.algorithm.influence_function import IFAttributorCG
from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.cli import main as cli_main
from dattri_cli.errors import ConfigError
from dattri_cli.io import load_score_set, load_scores

TRAK = ["attributor=trak", "attributor.projector_kwargs.proj_dim=16"]
CASES = {
    "grad_dot": ["attributor=grad_dot"],
    "if_cg": ["attributor=if_cg", "attributor.regularization=0.01", "attributor.max_iter=4"],
    "trak": TRAK,
}
BATCH = "loader.train_batch_size=10"  # 60 rows in 6 batches
BLOCKS = [BATCH, "output.rows_per_file=25"]  # rounded down to 2 whole batches per file -> 3 files


def block_names(count: int) -> list:
    return [f"scores-{i:05d}-of-{count:05d}.safetensors" for i in range(count)]


@pytest.mark.parametrize("name", list(CASES))
def test_merged_row_blocks_equal_the_single_file(small_run, tmp_path, name):
    full = pipeline.run(small_run(*CASES[name], BATCH, out="full.safetensors"))
    blocked = pipeline.run(small_run(*CASES[name], *BLOCKS, out="blocks/scores.safetensors"))
    assert [p.name for p in blocked.files] == block_names(3)
    assert blocked.scores is None and blocked.path == blocked.files[0]
    assert blocked.metadata == full.metadata
    assert [load_scores(p)[0]["scores"].shape[0] for p in blocked.files] == [20, 20, 20]
    cli_main(["merge", str(tmp_path / "blocks"), f"out={tmp_path / 'merged.safetensors'}"])
    assert (tmp_path / "merged.safetensors").read_bytes() == full.path.read_bytes()


def test_each_row_block_is_the_shard_file_of_its_index(small_run):
    blocked = pipeline.run(small_run(*BLOCKS, out="blocks/scores.safetensors"))
    shard = pipeline.run(small_run(BATCH, "shard.index=1", "shard.count=3", out="shard/scores.safetensors"))
    assert blocked.files[1].name == shard.path.name
    assert blocked.files[1].read_bytes() == shard.path.read_bytes()


def test_self_influence_sidecar_show_and_eval(small_run, tmp_path, capsys):
    # LiSSA draws random minibatches: the blocked run must keep the unblocked run's random state
    args = [
        "attributor=if_lissa",
        "attributor.recursion_depth=5",
        "+attributor.runner.self_influence=true",
        BATCH,
    ]
    full = pipeline.run(small_run(*args, out="full.safetensors"))
    blocked = pipeline.run(small_run(*args, "output.rows_per_file=20", out="blocks/scores.safetensors"))
    self_full = load_scores(full.path)[0]["self_influence"]
    for i, path in enumerate(blocked.files):
        assert load_scores(path)[0]["self_influence"].equal(self_full[20 * i : 20 * (i + 1)])
    merged = tmp_path / "merged.safetensors"
    cli_main(["merge", str(tmp_path / "blocks"), f"out={merged}"])
    assert merged.read_bytes() == full.path.read_bytes()
    capsys.readouterr()

    sidecar = json.loads((tmp_path / "blocks" / "scores.run.json").read_text())
    assert sidecar["scores"] == [str(p) for p in blocked.files]
    assert sidecar["config_hash"] == full.metadata["config_hash"]
    assert {"cache_s", "attribute_s", "peak_rss_mib"} <= set(sidecar["timings"])

    tensors, meta = load_score_set(blocked.files[2])  # what `dattri eval scores=...` reads
    assert tensors["scores"].equal(full.scores) and meta == full.metadata
    cli_main(["show", str(blocked.files[0]), "--json", "--no-labels"])
    assert json.loads(capsys.readouterr().out)["shape"] == [60, 12]
    assert blocked.first_test_scores.equal(full.scores[:, 0])
    summary.print_summary(blocked)
    assert "3 row-block files" in capsys.readouterr().out


COUNTED = {  # the expensive test-side step of each attributor, and which calls of it count
    "grad_dot": (TracInAttributor, "_rep", lambda kwargs: kwargs.get("target")),
    "if_cg": (IFAttributorCG, "transform_test_rep", lambda kwargs: True),  # noqa: ARG005
    "trak": (TRAKAttributor, "_features", lambda kwargs: kwargs.get("target")),
}


@pytest.mark.parametrize("name", list(COUNTED))
def test_test_side_is_computed_once_per_checkpoint(small_run, monkeypatch, name):
    cls, method, counts = COUNTED[name]
    original = getattr(cls, method)
    calls = []

    def counting(self, *args, **kwargs):
        if counts(kwargs):
            calls.append(args[0])  # the checkpoint index
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counting)
    ensemble = [*CASES[name], "train.num_models=2"]
    pipeline.run(small_run(*ensemble, BATCH, out="full.safetensors"))
    single = sorted(calls)
    calls.clear()
    blocked = pipeline.run(small_run(*ensemble, *BLOCKS, out="blocks/scores.safetensors"))
    assert len(blocked.files) == 3
    assert sorted(calls) == single and set(single) == {0, 1}


def test_memo_lives_only_for_the_blocked_scoring():
    attributor = SimpleNamespace(test_side_memo=None, keeps_test_side=True)
    with runner.remember_test_side(attributor):
        memo = attributor.test_side_memo
        loader = object()
        assert memo.get(0, loader, lambda: "first") == "first"
        assert memo.get(0, loader, lambda: "again") == "first"
        assert memo.get(1, loader, lambda: "other checkpoint") == "other checkpoint"
        assert memo.get(0, object(), lambda: "other loader") == "other loader"
    assert attributor.test_side_memo is None


def test_auto_splits_only_when_memory_is_short(small_run, monkeypatch, caplog):
    monkeypatch.setattr(runner, "available_memory", lambda: 4096)  # budget 2 KiB: one 16-row batch per file
    with caplog.at_level(logging.INFO, logger="dattri_cli"):
        # memory_guard=false: 4 KiB would (rightly) be refused by the memory guard; row blocks are tested here
        tight = pipeline.run(small_run("memory_guard=false", out="tight/scores.safetensors"))
    assert [p.name for p in tight.files] == block_names(4)
    assert "4 row-block files" in caplog.text and "available" in caplog.text
    for memory in (1 << 40, None):  # plenty, or unknown: one file
        monkeypatch.setattr(runner, "available_memory", lambda m=memory: m)
        roomy = pipeline.run(small_run(out=f"roomy{memory}/scores.safetensors"))
        assert roomy.files == [roomy.path] and roomy.path.name == "scores.safetensors"


def test_plan_files_rounds_to_whole_batches():
    full = runner.RowPlan(0, 1, 0, 1000, 1000, "full")
    spans = lambda blocks: [(b.start, b.stop) for b in blocks]  # noqa: E731
    assert spans(runner.plan_files(250, full, 100, 10, 12, None)) == [
        (i * 200, i * 200 + 200) for i in range(5)
    ]
    assert len(runner.plan_files(30, full, 100, 10, 12, None)) == 10  # below one batch: one batch per file
    assert runner.plan_files(5000, full, 100, 10, 12, None) == [full]
    assert runner.plan_files(None, full, 100, 10, 12, 10**9) == [full]
    assert (
        len(runner.plan_files(None, full, 100, 10, 12, 2 * 12 * 10 * 300)) == 4
    )  # 300 rows fit -> 3 batches per file
    shard = runner.RowPlan(1, 2, 500, 1000, 1000, "shard")
    assert runner.plan_files(None, shard, 100, 10, 12, 100) == [shard]  # a shard keeps one file (and warns)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert runner.available_memory(meminfo) == 8000000 * 1024
    meminfo.write_text("MemTotal:       16000000 kB\n")
    assert runner.available_memory(meminfo) is None
    assert runner.available_memory(tmp_path / "absent") is None


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", "true", "null"])
def test_bad_rows_per_file_is_a_config_error(small_run, value):
    with pytest.raises(ConfigError, match="output.rows_per_file must be auto or a positive"):
        pipeline.run(small_run(f"output.rows_per_file={value}"))


def test_rows_per_file_with_shards_or_torchrun_is_refused(small_run):
    with pytest.raises(ConfigError, match="shard.index/shard.count"):
        pipeline.run(small_run("output.rows_per_file=16", "shard.index=0", "shard.count=2"))
    with pytest.raises(ConfigError, match="torchrun"):
        runner.rows_per_file_setting({"rows_per_file": 16}, {}, world=2)
    assert runner.rows_per_file_setting({"rows_per_file": "auto"}, {"index": 0, "count": 2}, world=1) is None
    assert runner.rows_per_file_setting({"rows_per_file": "auto"}, {}, world=2) is None
