"""scripts/bench_big.py: its measuring frame, and tiny end-to-end runs (ours; peers where installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_big.py"


def load_bench():  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location("bench_big", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run_bench(tmp_path: Path, *extra: str, timeout: float = 600) -> dict:
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
        + ["--markdown", str(md), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    report["markdown"] = md.read_text()
    report["stdout"] = proc.stdout
    return report


def check_row(row: dict) -> None:
    assert row["peak_rss_gib"] > 0.05, row  # an interpreter with torch, at least
    if row["status"] == "ok":
        assert row["seconds"] > 0 and math.isfinite(row["ratio_to_floor"]) and row["ratio_to_floor"] > 0
        if row["method"] != "floor":
            assert row["finite"], row
    else:
        assert row["status"] in ("failed", "unsupported") and row["reason"], row


# ------------------------------------------------------------------------------------ the frame


def test_measure_reports_time_memory_unsupported_timeout_and_oom(tmp_path: Path) -> None:
    bench = load_bench()
    py = sys.executable
    env = {"PATH": "/usr/bin:/bin"}

    # peak RSS is the call's own (polled VmHWM here): 300 MiB touched shows up, the parent's does not
    alloc = (
        "import json, time; b = bytearray(300 * 2**20); time.sleep(0.3); print(json.dumps({'seconds': 0.5}))"
    )
    row = bench.measure([py, "-c", alloc], env, 60, None, tmp_path / "a.log")
    assert row["status"] == "ok" and row["seconds"] == 0.5
    assert 0.29 < row["peak_rss_gib"] < 1.0
    small = bench.measure(
        [py, "-c", "import json; print(json.dumps({'seconds': 1}))"], env, 60, None, tmp_path / "b.log"
    )
    assert small["peak_rss_gib"] < 0.1  # not the parent's (pytest with torch) size

    unsupported = "import json, sys; print(json.dumps({'unsupported': 'no such option'})); sys.exit(3)"
    row = bench.measure([py, "-c", unsupported], env, 60, None, tmp_path / "c.log")
    assert (row["status"], row["reason"]) == ("unsupported", "no such option")

    row = bench.measure([py, "-c", "import time; time.sleep(30)"], env, 1.0, None, tmp_path / "d.log")
    assert row["status"] == "failed" and "over the 1 s limit" in row["reason"] and row["wall_seconds"] < 20

    oom = "b = bytearray(2 * 2**30)"
    row = bench.measure([py, "-c", oom], env, 60, 0.5, tmp_path / "e.log")
    assert row["status"] == "failed" and row["reason"] == "out of memory (limit 0.5 GiB)"

    row = bench.measure([py, "-c", "raise KeyError('boom')"], env, 60, None, tmp_path / "f.log")
    assert (
        row["status"] == "failed" and row["reason"].startswith("exit 1: KeyError") and "boom" in row["reason"]
    )


def test_settings_fill_and_markdown() -> None:
    bench = load_bench()
    filled = bench._fill(bench.OURS["trak_dense"], 2048)
    assert (
        filled["projector_kwargs"]["proj_dim"] == 2048
        and bench.OURS["trak_dense"]["projector_kwargs"]["proj_dim"] == "{proj_dim}"
    )
    rows = [
        {
            "model": "m",
            "method": "floor",
            "side": "ours",
            "status": "ok",
            "seconds": 2.0,
            "ratio_to_floor": 1.0,
        },
        {"model": "m", "method": "trak_dense", "side": "traker", "status": "failed", "reason": "a | b"},
        {
            "model": "m",
            "method": "ekfac",
            "side": "kronfluence",
            "status": "ok",
            "seconds": 3.0,
            "ratio_to_floor": 1.5,
            "peak_rss_gib": 1.25,
            "agreement": {"pearson": 0.5, "spearman": 0.25},
        },
    ]
    lines = bench.markdown(rows).splitlines()
    assert len(lines) == 5 and all(line.count("|") == 8 for line in lines)
    assert "| m | trak_dense | traker | failed: a / b | - |" in lines[3]
    assert lines[4] == "| m | ekfac | kronfluence | 3.00 | 1.50 | 1.25 | 0.500 / 0.250 |"


# ------------------------------------------------------------------------------------ end to end


def test_smoke_resnet_grad_dot_matches_brute_force(tmp_path: Path) -> None:
    """Ours only, two calls: the floor and Grad-Dot, whose scores are checked against
    per-sample gradients computed here by hand on the same saved model and data."""
    small = ["--n-train", "8", "--n-test", "4", "--batch", "4"]
    report = run_bench(
        tmp_path, "--models", "resnet18", "--methods", "grad_dot", "--peers", "none", *small, timeout=300
    )
    rows = report["rows"]
    assert [(r["method"], r["side"]) for r in rows] == [("floor", "ours"), ("grad_dot", "ours")]
    for row in rows:
        assert row["status"] == "ok", row
        check_row(row)
    assert "| resnet18 | grad_dot | ours |" in report["markdown"]

    sys.path.insert(0, str(SCRIPT.parent / "peers"))
    import bench_models as bm  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415
    from torch.func import functional_call, grad, vmap  # noqa: PLC0415

    spec, model, data, _ = bm.load_inputs(tmp_path / "work" / "resnet18")
    assert bm.num_params(model) == 45102 and spec["n_train"] == 8
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    def flat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([v.reshape(len(x), -1) for v in g.values()], dim=1).double()

    expected = flat(data["x_train"], data["y_train"]) @ flat(data["x_test"], data["y_test"]).T
    got = load_file(str(tmp_path / "work" / "resnet18" / "grad_dot_ours.safetensors"))["scores"].double()
    assert got.shape == (8, 4)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_unknown_kwarg_is_an_unsupported_row(tmp_path: Path) -> None:
    bench = load_bench()
    assert bench.OURS["grad_dot"]["kwargs"] == {"normalized_grad": False}
    sys.path.insert(0, str(SCRIPT.parent / "peers"))
    import bench_models as bm  # noqa: PLC0415

    folder = tmp_path / "resnet18"
    bm.write_inputs(folder, bm.default_spec("resnet18", smoke=True), 4, 2, train_steps=1)
    job = {
        "work": str(folder),
        "method": "grad_dot",
        "settings": {**bench.OURS["grad_dot"], "kwargs": {"normalized_grad": False, "no_such_option": 1}},
        "batch": 2,
        "threads": 1,
        "device": "cpu",
        "out": str(folder / "x.safetensors"),
    }
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SCRIPT.parents[1])}
    row = bench.measure(
        [sys.executable, str(SCRIPT), "--worker", json.dumps(job)], env, 300, None, tmp_path / "w.log"
    )
    assert row["status"] == "unsupported" and "no_such_option" in row["reason"], row


@pytest.mark.slow
def test_smoke_every_method_and_installed_peers(tmp_path: Path) -> None:
    """Both models, every method; the peers whose virtual environments exist (skipped otherwise)."""
    bench = load_bench()
    peers = [
        name
        for name, peer in bench.PEERS.items()
        if bench.peer_available(peer["python"], peer["probe"]) is None
    ]
    report = run_bench(tmp_path, "--peers", ",".join(peers) or "none")
    rows = report["rows"]
    expected = []
    for model in ("resnet18", "bert"):
        for method in bench.METHODS:
            expected.append((model, method, "ours"))
            expected += [(model, method, p) for p in peers if method in bench.PEERS[p]["table"]]
    assert [(r["model"], r["method"], r["side"]) for r in rows] == expected
    for row in rows:
        check_row(row)
        if row["side"] == "ours" and row["method"] != "trak_kronecker":
            assert row["status"] == "ok", row
        if row["side"] != "ours" and row["status"] == "ok" and row["method"] in ("grad_dot", "tracin"):
            assert row["agreement"]["pearson"] > 0.999, row  # exact methods agree with ours
    assert report["markdown"].count("| resnet18 |") == sum(1 for r in rows if r["model"] == "resnet18")
