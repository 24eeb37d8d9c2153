"""The memory-guard benchmark: one real case end to end, and its verdicts on hand-made rows."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_memory_guard.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_memory_guard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_verdicts_and_table() -> None:
    bench = _module()
    row = bench.Row
    assert row("a", 400.0, 300.0, 500.0, 1.0, "x").ratio() == 2.0  # 400 / (500 - 300)
    assert bench.verdict(row("a", 400.0, 300.0, 500.0, 1.0, "x"), 32) == "ok"
    assert bench.verdict(row("a", 100.0, 300.0, 500.0, 1.0, "x"), 32) == "UNDER"
    assert bench.verdict(row("a", 700.0, 300.0, 500.0, 1.0, "x"), 32) == "over (>3x)"
    assert bench.verdict(row("a", 10.0, 300.0, 320.0, 1.0, "x"), 32) == "small"
    assert bench.verdict(row("a", None, None, 16.0, 0.0, "", "boom"), 32) == "failed: boom"
    table = bench.table([row("a", 400.0, 300.0, 500.0, 1.0, "x")], 32, markdown=True)
    assert table.splitlines()[2] == "| a | 400 | x | 300 | 500 | 200 | 2.00 | 1 | ok |"
    labels = [label for label, _ in bench.cases()]
    assert len(labels) == len(set(labels)) and "digits mlp/if_explicit" in labels


def test_one_case_reads_the_estimate_from_the_sidecar(tmp_path: Path) -> None:
    bench = _module()
    overrides = [
        "model=lr",
        "attributor=grad_dot",
        "dataset.n_train=60",
        "dataset.n_test=10",
        "train.epochs=1",
    ]
    got = bench.run_case("lr", overrides, tmp_path, tmp_path / "cache", timeout=300)
    assert got.error == "", got.error
    assert got.estimate is not None and got.base is not None and got.peak > got.base
    assert got.largest == "runtime"  # 650 parameters: the fixed share dominates
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--only" in proc.stdout
