"""The EK-FAC benchmark runs end to end on a tiny workload, scoring LDS with the package's tooling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ekfac.py"


def test_bench_ekfac_smoke(tmp_path: Path, cache_dir) -> None:
    env = {**os.environ, "DATTRI_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--subsets",
            "4",
            "--only",
            "if_ekfac (config",
            "--work-dir",
            str(tmp_path / "gt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(results) == ["if_ekfac (config: auto damping)"]
    row = results["if_ekfac (config: auto damping)"]
    assert row["time"] > 0 and -1.0 <= row["lds"] <= 1.0 and len(row["ci"]) == 2
    assert (tmp_path / "gt" / "groundtruth.safetensors").is_file()
