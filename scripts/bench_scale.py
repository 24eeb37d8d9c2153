"""Peak memory and throughput of Grad-Dot, TRAK and CG as the training set grows.

Each (method, n_train) runs `dattri_cli.pipeline.run` in its own subprocess on the
synthetic dataset (so peak RSS is that run's alone), with the train-side feature
cache on disk in a fresh temporary directory. Reported per run: peak RSS, the score
matrix size, RSS minus that size ("working memory") and its ratio to the smallest
n_train, and throughput in training samples per second over cache + attribute.

    python scripts/bench_scale.py                 # 1k, 10k, 50k training samples
    python scripts/bench_scale.py --sizes 1000 5000 --methods grad_dot
    python scripts/bench_scale.py --smoke         # tiny sizes, seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {
    "grad_dot": ["attributor=grad_dot"],
    "trak": ["attributor=trak", "attributor.projector_kwargs.proj_dim={proj_dim}"],
    "cg": ["attributor=if_cg", "attributor.regularization=0.01", "attributor.max_iter=5"],
}


def child(method: str, n_train: int, n_test: int, proj_dim: int, workdir: str) -> None:
    """One run in this process; prints a JSON line with its measurements."""
    from hydra import compose, initialize_config_module  # noqa: PLC0415

    from dattri_cli import pipeline  # noqa: PLC0415

    overrides = [o.format(proj_dim=proj_dim) for o in METHODS[method]] + [
        "dataset=synthetic",
        f"dataset.n_samples={n_train + n_test}",
        f"dataset.n_train={n_train}",
        f"dataset.n_test={n_test}",
        "train.epochs=2",
        "loader.train_batch_size=256",
        "progress=off",
        f"cache_dir={workdir}/cache",
        f"out={workdir}/scores.safetensors",
    ]
    with initialize_config_module(config_module="dattri_cli.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides)
    result = pipeline.run(cfg)
    seconds = result.timings["cache_s"] + result.timings["attribute_s"]
    print(
        json.dumps(
            {
                "method": method,
                "n_train": n_train,
                "n_test": n_test,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "output_mib": n_train * n_test * 4 / 2**20,
                "seconds": seconds,
                "train_samples_per_s": n_train / seconds,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument(
        "--proj-dim",
        type=int,
        default=32,
        help="TRAK projection; at most the 63 parameters of the synthetic LR",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script works")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N_TRAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.n_test, args.proj_dim = [200, 400], 10, 16
    if args.child:
        child(args.child[0], int(args.child[1]), args.n_test, args.proj_dim, os.environ["BENCH_WORKDIR"])
        return
    rows = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    print(
        f"{'method':9} {'n_train':>8} {'peak RSS MiB':>13} {'output MiB':>11} {'RSS-out MiB':>12} {'vs first':>9} {'samples/s':>10}"
    )
    for method in args.methods:
        base = None
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as work:
                env["BENCH_WORKDIR"] = work
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    str(n),
                    "--n-test",
                    str(args.n_test),
                    "--proj-dim",
                    str(args.proj_dim),
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                sys.exit(f"{method} n_train={n} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            working = row["peak_rss_mib"] - row["output_mib"]
            base = working if base is None else base
            row["working_mib"], row["working_vs_first"] = working, working / base
            rows.append(row)
            print(
                f"{method:9} {n:>8} {row['peak_rss_mib']:>13.1f} {row['output_mib']:>11.1f} {working:>12.1f} {working / base:>8.2f}x {row['train_samples_per_s']:>10.0f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
