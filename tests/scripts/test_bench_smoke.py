"""The benchmark script runs end to end on a tiny workload (ours only) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_attributors.py"


def test_bench_smoke_without_dattri(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--no-dattri",
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running ours only" in proc.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report) == {"meta", "rows"}
    assert report["meta"]["dattri"] is None and report["meta"]["reps"] == 1
    names = [row["attributor"] for row in report["rows"]]
    assert names == ["if_cg", "grad_dot", "trak_proj"]
    for row in report["rows"]:
        ours = row["ours"]
        assert ours["errors"] == [], ours["errors"]
        assert ours["seconds_median"] > 0 and ours["peak_rss_mib_max"] > 0
        assert (
            row["dattri"]["seconds_median"] is None and row["time_ratio"] is None and row["agreement"] is None
        )
        assert row["runs"]["ours"][0]["shape"] == [60, 12] and row["runs"]["ours"][0]["finite"]
    grad_dot = report["rows"][1]
    assert grad_dot["floor_seconds_median"] > 0 and grad_dot["ours_over_floor"] > 0
    assert "| smoke | grad_dot |" in out.with_suffix(".md").read_text()
