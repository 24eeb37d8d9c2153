"""Everything read back from cache_dir is checked first: a corrupt artifact is a miss, recomputed and replaced.

Each case corrupts one cached artifact (checkpoint, its manifest, a feature block,
a whole-training-set stage, a store's key.json) after a clean run, reruns the same
job and checks the score file equals the clean run's bytes, that one log line named
the problem, and that the rerun healed the cache (a third run logs nothing).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from safetensors.torch import load_file, save_file

from dattri_cli import pipeline
from tests.conftest import compose_run
from tests.scale.helpers import small_overrides


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(cache: Path, out: Path, *overrides: str):
    base = small_overrides(cache, out)
    logger = logging.getLogger("dattri_cli")
    handler = _Lines()
    logger.addHandler(handler)
    try:
        result = pipeline.run(compose_run(base + list(overrides)))
    finally:
        logger.removeHandler(handler)
    return result, [line for line in handler.lines if "cache" in line]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zeros(path: Path) -> None:
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}, str(path))


def _wrong_shape(path: Path) -> None:
    block = load_file(str(path))["block"]
    save_file({"block": torch.randn(block.shape[0], block.shape[1] - 3)}, str(path))


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


def _checkpoint(cache: Path) -> Path:
    return sorted((cache / "checkpoints").rglob("model0_*.safetensors"))[-1]


def _manifest(cache: Path) -> Path:
    return next((cache / "checkpoints").rglob("manifest.json"))


def _block(kind: str, index: int = 1) -> Callable[[Path], Path]:
    return lambda cache: sorted((cache / "features" / kind).rglob("*.safetensors"))[index]


def _key(cache: Path) -> Path:
    return next((cache / "features" / "train_grads").rglob("key.json"))


def _swap(cache: Path) -> None:  # another block's (valid, recorded) file under this block's name
    first, second = sorted((cache / "features" / "train_grads").rglob("r*.safetensors"))[:2]
    shutil.copyfile(first, second)


GRAD_DOT = ["attributor=grad_dot"]
TRAK = ["attributor=trak", "attributor.projector_kwargs.proj_dim=16"]
EXPLICIT = ["attributor=if_explicit", "attributor.regularization=0.01"]

CASES = {
    "checkpoint truncated": (GRAD_DOT, lambda c: _truncate(_checkpoint(c))),
    "checkpoint replaced by zeros": (GRAD_DOT, lambda c: _zeros(_checkpoint(c))),
    "manifest not json": (GRAD_DOT, lambda c: _manifest(c).write_text("{not json")),
    "manifest empty": (GRAD_DOT, lambda c: _manifest(c).write_text("")),
    "manifest empty list": (GRAD_DOT, lambda c: _manifest(c).write_text("[]")),
    "manifest a directory": (GRAD_DOT, lambda c: _directory(_manifest(c))),
    "block truncated": (GRAD_DOT, lambda c: _truncate(_block("train_grads")(c))),
    "block replaced by zeros": (GRAD_DOT, lambda c: _zeros(_block("train_grads")(c))),
    "block of the wrong shape": (GRAD_DOT, lambda c: _wrong_shape(_block("train_grads")(c))),
    "block of another block": (GRAD_DOT, _swap),
    "block a directory": (GRAD_DOT, lambda c: _directory(_block("train_grads")(c))),
    "key.json a directory": (GRAD_DOT, lambda c: _directory(_key(c))),
    "key.json not text": (GRAD_DOT, lambda c: _key(c).write_bytes(b"\xff\xfe")),
    "trak block of the wrong shape": (TRAK, lambda c: _wrong_shape(_block("trak_features")(c))),
    "trak block replaced by zeros": (TRAK, lambda c: _zeros(_block("trak_features")(c))),
    "hessian replaced by zeros": (EXPLICIT, lambda c: _zeros(_block("hessian", 0)(c))),
    "hessian truncated": (EXPLICIT, lambda c: _truncate(_block("hessian", 0)(c))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_cache_entry_is_recomputed_to_the_same_bytes(case, tmp_path):
    overrides, corrupt = CASES[case]
    cache = tmp_path / "cache"
    clean, lines = _run(cache, tmp_path / "clean.safetensors", *overrides)
    assert not lines
    corrupt(cache)
    healed, lines = _run(cache, tmp_path / "healed.safetensors", *overrides)
    assert healed.path.read_bytes() == clean.path.read_bytes()
    assert len(lines) == 1, lines
    again, lines = _run(cache, tmp_path / "again.safetensors", *overrides)
    assert not lines, lines  # the bad entry was replaced
    assert again.path.read_bytes() == clean.path.read_bytes()
