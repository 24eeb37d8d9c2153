"""The Hydra-multirun solver sweep runs and compares against Explicit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_solvers_cli.py"


def test_sweep_smoke(tmp_path, cache_dir):
    env = {**os.environ, "DATTRI_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--solvers",
            "if_explicit,if_cg",
            "--sweep-dir",
            str(tmp_path / "sw"),
            "--",
            "train.weight_decay=0.1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`if_explicit`", "`if_cg`"}
    spearman = float(rows["`if_cg`"].split("|")[3])
    assert spearman > 0.99  # strong L2: well conditioned, so 10 CG iterations reach the exact solve
