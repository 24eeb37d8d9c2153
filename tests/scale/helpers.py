"""What the multi-process and cache tests share: the small run's overrides and a free port."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import List


def small_overrides(cache: Path, out: Path) -> List[str]:
    """A 60 x 12 digits run in 4 training batches, writing ``out`` and caching under ``cache``."""
    return [
        "dataset.n_train=60",
        "dataset.n_test=12",
        "train.epochs=3",
        "loader.train_batch_size=16",
        "loader.test_batch_size=5",
        "progress=off",
        f"cache_dir={cache}",
        f"out={out}",
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
