"""Per-sample gradient costs on a ResNet-style CNN, side by side with the backward-pass floor (issue 17).

Four ways to get train x test gradient scores on the same model, images and batches:

* ``full``: ``torch.func`` per-sample gradients of every parameter (``vmap(grad)``), the
  ``(n, P)`` matrices of train and test, then one matrix product;
* ``factored``: :mod:`dattri_cli.func.layer_grads`, one hooked forward/backward pass
  per batch and per-layer inner products from the layer inputs and output gradients;
* ``kronecker``: the same passes, each layer projected by :mod:`dattri_cli.func.kronecker`
  (about 4k dimensions in all), then one matrix product; ``kronecker_batched`` the same
  with ``deterministic=False`` (whole-batch products, not bit-stable across groupings);
* ``floor``: one plain batched forward and ``loss.backward()`` over the same images.

Each method runs in its own subprocess (peak resident memory is per process), the
methods alternate within each repetition, and the table reports medians and the
ratios to the floor, of wall time and of the process's CPU time (on a shared machine
the CPU-time ratio is the steadier one). Not a test; results go in docs/benchmarks.md.

    python scripts/bench_layer_grads.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.functional import cross_entropy

from dattri_cli.func import kronecker as kr
from dattri_cli.func import layer_grads as lg

METHODS = ("floor", "full", "factored", "kronecker", "kronecker_batched")


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(width, width), conv_bn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet(widths: tuple = (32, 64, 128, 256), classes: int = 10) -> nn.Module:
    """A ResNet-9-style network at a quarter of the usual widths (about 1.6M parameters)."""
    w0, w1, w2, w3 = widths
    return nn.Sequential(
        conv_bn(3, w0),
        conv_bn(w0, w1),
        nn.MaxPool2d(2),
        Residual(w1),
        conv_bn(w1, w2),
        nn.MaxPool2d(2),
        conv_bn(w2, w3),
        nn.MaxPool2d(2),
        Residual(w3),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(w3, classes),
    )


def setup(args: argparse.Namespace) -> tuple:
    torch.manual_seed(0)
    model = resnet().eval()  # BatchNorm in eval mode: samples do not interact
    g = torch.Generator().manual_seed(1)
    n = args.n_train + args.n_test
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    train = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.n_train, args.batch)]
    test = [(x[args.n_train :], y[args.n_train :])]
    return model, train, test


def per_sample_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return cross_entropy(model(batch[0]), batch[1], reduction="none")


def run_floor(model: nn.Module, train: list, test: list) -> torch.Tensor:
    for x, y in train + test:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x), y, reduction="sum").backward()
    return torch.zeros(0)


def run_full(model: nn.Module, train: list, test: list) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(model, {**p, **buffers}, (x[None],)), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(batches: list) -> torch.Tensor:
        rows = []
        for x, y in batches:
            g = per_sample(params, x, y)
            rows.append(torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], dim=1))
        return torch.cat(rows)

    return flat(train) @ flat(test).T


def run_factored(model: nn.Module, train: list, test: list) -> torch.Tensor:
    test_caps = lg.capture(model, per_sample_loss, test[0])
    cache: dict = {}  # the test side's materialised layer gradients, reused for every train batch
    rows = [
        lg.inner_products(lg.capture(model, per_sample_loss, b), test_caps, right_cache=cache) for b in train
    ]
    return torch.cat(rows)


def projector(model: nn.Module, total_dim: int = 4096) -> kr.KroneckerProjector:
    """About ``total_dim`` dimensions in all: ``total_dim / layers`` per layer."""
    return kr.KroneckerProjector(proj_dim=max(1, total_dim // len(lg.default_layers(model))), seed=0)


def run_kronecker(model: nn.Module, train: list, test: list, deterministic: bool = True) -> torch.Tensor:
    proj = projector(model)
    proj.deterministic = deterministic
    test_feat = proj.project(lg.capture(model, per_sample_loss, test[0]))
    train_feat = torch.cat([proj.project(lg.capture(model, per_sample_loss, b)) for b in train])
    return train_feat @ test_feat.T


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, train, test = setup(args)
    run = {
        "floor": run_floor,
        "full": run_full,
        "factored": run_factored,
        "kronecker": run_kronecker,
        "kronecker_batched": lambda *a: run_kronecker(*a, deterministic=False),
    }[args.one]
    run_floor(model, [(train[0][0][:1], train[0][1][:1])], [])  # one-time kernel set-up, outside the timing
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = run(model, train, test)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(scores, args.scores)
    dims = None
    if args.one.startswith("kronecker"):
        one = (test[0][0][:1], test[0][1][:1])
        dims = int(projector(model).project(lg.capture(model, per_sample_loss, one)).shape[1])
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_mib": peak / 1024,
                "base_mib": base_rss / 1024,
                "dims": dims,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return
    methods = args.methods.split(",")
    model = resnet()
    n_params = sum(p.numel() for p in model.parameters())
    results = {m: [] for m in methods}
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for m in methods:
                path = Path(tmp) / f"{m}.pt"
                cmd = [sys.executable, __file__, "--one", m, "--scores", str(path)]
                cmd += ["--n-train", str(args.n_train), "--n-test", str(args.n_test)]
                cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"{m} failed (rc {proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
                    results[m].append(None)
                    continue
                results[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if rep == 0:
                    scores[m] = torch.load(
                        path, weights_only=True
                    )  # tensors this script wrote; never pickles
                print(f"rep {rep} {m}: {results[m][-1]}", file=sys.stderr, flush=True)
    print(
        f"model: ResNet-9-style CNN, widths 32-64-128-256, {n_params:,} parameters; "
        f"{args.n_train} train / {args.n_test} test images 3x32x32, batches of {args.batch}, "
        f"{args.threads} threads, torch {torch.__version__}, {args.reps} reps (medians)"
    )
    floors = [r for r in results.get("floor", []) if r]
    floor = statistics.median(r["seconds"] for r in floors) if floors else None
    cpu_floor = statistics.median(r["cpu_seconds"] for r in floors) if floors else None
    print(
        "| method | wall (s) | x floor | CPU (s) | x floor | peak RSS (MiB) | peak - RSS after setup (MiB) "
        "| scores vs full |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    ref = scores.get("full")
    for m in methods:
        ok = [r for r in results[m] if r]
        if not ok:
            print(f"| {m} | failed | | | | | | |")
            continue
        sec = statistics.median(r["seconds"] for r in ok)
        cpu = statistics.median(r["cpu_seconds"] for r in ok)
        cpu_ratio = f"{cpu / cpu_floor:.2f}" if cpu_floor else "-"
        peak = statistics.median(r["peak_mib"] for r in ok)
        extra = statistics.median(r["peak_mib"] - r["base_mib"] for r in ok)
        ratio = f"{sec / floor:.2f}" if floor else "-"
        agree = "-"
        if ref is not None and m in scores and scores[m].numel():
            s = scores[m]
            if m == "factored":
                agree = f"max rel. diff {float((s - ref).abs().max() / ref.abs().max()):.1e}"
            else:
                a, b = s.flatten() - s.mean(), ref.flatten() - ref.mean()
                corr = float(a @ b / (a.norm() * b.norm()))
                dims = ok[0].get("dims")
                agree = f"Pearson {corr:.3f}" + (f" ({dims} dims)" if dims else "")
        print(f"| {m} | {sec:.2f} | {ratio} | {cpu:.2f} | {cpu_ratio} | {peak:.0f} | {extra:.0f} | {agree} |")


if __name__ == "__main__":
    main()
