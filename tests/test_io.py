"""Score-file writing: permissions, full disks, file-size limits and sidecar names."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dattri_cli import io, pipeline
from dattri_cli.errors import DattriError


def _save(path: Path, rows: int = 4) -> None:
    io.save_scores(path, torch.ones(rows, 3), torch.arange(rows), torch.arange(3), {"x": 1})


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_score_files_get_the_umask_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        _save(tmp_path / "s.safetensors")
        io.write_sidecar(tmp_path / "s.run.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("s.safetensors", "s.run.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_full_disk_leaves_no_partial_file(tmp_path):
    def fill_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "s.safetensors"
    with pytest.raises(DattriError, match=r"cannot write .*s\.safetensors: no space left on device"):
        io.atomic_write(target, fill_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_is_one_line_and_no_partial_file(tmp_path):
    """``ulimit -f``: the write fails (SIGXFSZ ignored by the CLI), nothing half-written stays."""
    pytest.importorskip("resource")
    for index, rows in enumerate(((0, 2000), (2000, 4000))):
        shard = {"index": index, "count": 2, "rows": list(rows), "n_train": 4000}
        io.save_scores(
            tmp_path / f"scores-{index:05d}-of-00002.safetensors",
            torch.ones(2000, 20),
            torch.arange(*rows),
            torch.arange(20),
            {"config_hash": "a", "shard": shard},
        )
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from dattri_cli import cli
        cli.main(["merge", {str(tmp_path)!r}, "out={tmp_path / "merged.safetensors"}"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "merged.safetensors: no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".merged", "merged"))]


def test_sidecar_failure_says_the_scores_were_written(small_run, tmp_path, monkeypatch):
    def no_space(path, info):
        io.atomic_write(
            Path(path),
            lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),  # noqa: ARG005
        )

    monkeypatch.setattr(io, "write_sidecar", no_space)
    with pytest.raises(DattriError) as info:
        pipeline.run(small_run())
    message = str(info.value)
    assert "scores were written" in message and "scores.run.json: no space left" in message
    assert (tmp_path / "scores.safetensors").is_file() and not (tmp_path / "scores.run.json").exists()


def test_sidecar_is_named_after_the_score_file(small_run, tmp_path):
    pipeline.run(small_run(out="results/a.safetensors"))
    pipeline.run(small_run("seed=1", out="results/b.safetensors"))
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == ["a.run.json", "a.safetensors", "b.run.json", "b.safetensors"]
    assert io.sidecar_path(Path("x/scores.safetensors")) == Path("x/scores.run.json")
