"""Row-block shards: merged shards equal the unsharded run, byte for byte; merge refuses bad sets."""

from __future__ import annotations

import pytest
import torch

from dattri_cli import pipeline
from dattri_cli.cli import main as cli_main
from dattri_cli.errors import DattriError
from dattri_cli.io import load_scores, merge_shards, open_score_set

TRAK = ["attributor=trak", "attributor.projector_kwargs.proj_dim=16"]
CASES = {
    "grad_dot": ["attributor=grad_dot"],
    "if_cg": ["attributor=if_cg", "attributor.regularization=0.01"],
    "trak": TRAK,
}


@pytest.mark.parametrize("name", list(CASES))
def test_merged_shards_equal_unsharded_bytes(small_run, tmp_path, name):
    full = pipeline.run(small_run(*CASES[name], out="full.safetensors"))
    paths = []
    for i in range(3):  # 60 rows in 4 batches of 16 -> shards of 1, 1 and 2 batches
        result = pipeline.run(
            small_run(*CASES[name], f"shard.index={i}", "shard.count=3", out="part.safetensors")
        )
        assert result.path.name == f"part-{i:05d}-of-00003.safetensors"
        assert result.metadata["config_hash"] == full.metadata["config_hash"]
        paths.append(result.path)
    merged = merge_shards(paths, tmp_path / "merged.safetensors")
    assert merged.read_bytes() == full.path.read_bytes()


def test_merge_cli_directory_and_refusals(small_run, tmp_path, capsys):
    shard_dir = tmp_path / "shards"
    for i in range(2):
        pipeline.run(small_run(f"shard.index={i}", "shard.count=2", out="shards/s.safetensors"))
    cli_main(["merge", str(shard_dir), f"out={tmp_path / 'm.safetensors'}"])
    full = pipeline.run(small_run(out="f.safetensors"))
    assert (tmp_path / "m.safetensors").read_bytes() == full.path.read_bytes()

    lazy = open_score_set(str(shard_dir / "*-of-00002.safetensors"))
    assert torch.equal(lazy.rows(10, 40), full.scores[10:40])
    assert torch.equal(lazy.column(3), full.scores[:, 3])
    assert torch.equal(lazy.train_indices, load_scores(full.path)[0]["train_indices"])

    with pytest.raises(DattriError, match="missing"):
        merge_shards([shard_dir / "s-00000-of-00002.safetensors"], tmp_path / "x.safetensors")
    other = pipeline.run(small_run("shard.index=1", "shard.count=2", "seed=3", out="o.safetensors"))
    with pytest.raises(DattriError, match="different runs"):
        merge_shards([shard_dir / "s-00000-of-00002.safetensors", other.path], tmp_path / "x.safetensors")
    overlap = pipeline.run(small_run("shard.index=1", "shard.count=4", out="ov.safetensors"))
    with pytest.raises(DattriError, match="exactly once"):
        merge_shards(
            [
                shard_dir / "s-00000-of-00002.safetensors",
                overlap.path,
                shard_dir / "s-00001-of-00002.safetensors",
            ],
            tmp_path / "x.safetensors",
        )
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit):
        cli_main(["merge", str(shard_dir)])
    assert "out=PATH" in capsys.readouterr().err


def test_bad_shard_settings_are_one_line_errors(small_run):
    with pytest.raises(DattriError, match="shard.index"):
        pipeline.run(small_run("shard.index=3", "shard.count=3"))
    with pytest.raises(DattriError, match="training batches"):
        pipeline.run(small_run("shard.index=0", "shard.count=9"))


def test_merge_finds_shards_of_one_job_in_sibling_run_folders(small_run, tmp_path, cache_dir):
    """Without out=, each shard run gets its own timestamped folder; merge of one folder finds the rest."""
    from tests.conftest import compose_run

    full = pipeline.run(small_run(out="full.safetensors"))
    cfg_args = [
        "dataset.n_train=60",
        "dataset.n_test=12",
        "train.epochs=3",
        "loader.train_batch_size=16",
        "loader.test_batch_size=5",
        "progress=off",
        f"cache_dir={cache_dir}",
    ]  # small_run's, without out=
    runs = tmp_path / "outputs" / "2026-01-01"
    for i, folder in enumerate(("10-00-00_grad_dot_digits_lr", "10-05-00_grad_dot_digits_lr")):
        pipeline.run(compose_run([*cfg_args, f"shard.index={i}", "shard.count=2"]), output_dir=runs / folder)
    other = compose_run([*cfg_args, "seed=5", "shard.index=1", "shard.count=2"])
    pipeline.run(other, output_dir=runs / "10-09-00_grad_dot_digits_lr")  # another job: never picked up
    cli_main(["merge", str(runs / "10-00-00_grad_dot_digits_lr"), f"out={tmp_path / 'm.safetensors'}"])
    assert (tmp_path / "m.safetensors").read_bytes() == full.path.read_bytes()
    with pytest.raises(DattriError, match="missing"):  # an explicit list of files is taken as given
        merge_shards(
            [runs / "10-00-00_grad_dot_digits_lr" / "scores-00000-of-00002.safetensors"],
            tmp_path / "x.safetensors",
        )
