"""scripts/bench_scale.py --smoke runs end to end (one method, two tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_scale.py"),
            "--smoke",
            "--methods",
            "trak",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["n_train"] for r in rows] == [200, 400]
    assert all(r["peak_rss_mib"] > 0 and r["train_samples_per_s"] > 0 for r in rows)
    assert "samples/s" in done.stdout
