"""Run every influence-function solver through `dattri run -m` and compare them in one table.

The same Hydra multirun a user would type; each job writes its own run directory,
and this script reads them back: cache+attribute time from `scores.run.json`, agreement
with `if_explicit` (when it is in the sweep) from the score files.

    python scripts/sweep_solvers_cli.py                       # digits + lr, 1000 train / 200 test
    python scripts/sweep_solvers_cli.py --solvers if_cg,if_ekfac -- model=mlp attributor.regularization=0.01
    python scripts/sweep_solvers_cli.py --smoke               # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from dattri_cli.compare import compare_scores
from dattri_cli.io import load_scores

SOLVERS = ["if_explicit", "if_cg", "if_lissa", "if_arnoldi", "if_datainf", "if_ekfac", "if_kfac"]
SMOKE = ["dataset.n_train=60", "dataset.n_test=10", "train.epochs=3"]


def run_sweep(solvers: List[str], overrides: List[str], sweep_dir: Path) -> None:
    """One `dattri run -m` over the solvers; a failing job stops the sweep with its message."""
    exe = shutil.which("dattri")
    cmd = [exe] if exe else [sys.executable, "-m", "dattri_cli"]
    cmd += [
        "run",
        "-m",
        f"attributor={','.join(solvers)}",
        "progress=off",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    print("$ " + " ".join(cmd[1:] if exe else cmd), flush=True)
    subprocess.run(cmd, check=True)


def collect(sweep_dir: Path) -> Dict[str, Dict]:
    """``{attributor: {"scores": tensor, "seconds": float}}`` from the sweep's job dirs."""
    found = {}
    for scores_path in sorted(sweep_dir.glob("*/scores.safetensors")):
        tensors, meta = load_scores(scores_path)
        timings = json.loads((scores_path.parent / "scores.run.json").read_text())["timings"]
        name = meta["choices"]["attributor"]
        found[name] = {"scores": tensors["scores"], "seconds": timings["cache_s"] + timings["attribute_s"]}
    return found


def table(results: Dict[str, Dict]) -> str:
    """Markdown table; agreement columns only when if_explicit ran."""
    ref = results.get("if_explicit")
    lines = [
        "| solver | cache+attribute (s) | Spearman vs explicit | max rel. diff vs explicit |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, res in results.items():
        if ref is None or name == "if_explicit":
            agree = ("-", "-")
        else:
            stats = compare_scores(res["scores"], ref["scores"])
            scale = float(ref["scores"].abs().max()) or 1.0
            max_rel = float((res["scores"].double() - ref["scores"].double()).abs().max()) / scale
            agree = (f"{stats['spearman']:.4f}", f"{max_rel:.2e}")
        lines.append(f"| `{name}` | {res['seconds']:.2f} | {agree[0]} | {agree[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated attributor configs")
    parser.add_argument("--sweep-dir", help="where the jobs write (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a tiny workload (used by the tests)")
    parser.add_argument("overrides", nargs="*", help="extra `dattri run` overrides, after --")
    args = parser.parse_args()
    solvers = [s for s in args.solvers.split(",") if s]
    sweep_dir = Path(args.sweep_dir or tempfile.mkdtemp(prefix="dattri-sweep-"))
    overrides = (SMOKE if args.smoke else []) + list(args.overrides)
    run_sweep(solvers, overrides, sweep_dir)
    print(table(collect(sweep_dir)))


if __name__ == "__main__":
    main()
