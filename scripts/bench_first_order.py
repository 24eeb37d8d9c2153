"""Grad-Dot and TRAK on a ResNet-18 (11.2M parameters): torch.func vs the layers backend, against the floor.

The attributors themselves (``TracInAttributor`` as Grad-Dot, ``TRAKAttributor``) on a
hand-written CIFAR-style ResNet-18 (BatchNorm in eval mode, no torchvision), synthetic
3x32x32 images, the built-in training loss (cross-entropy + L2, dattri's per-sample
convention), one checkpoint:

* ``floor``: one plain batched forward + ``loss.backward()`` over train + test;
* ``grad_dot_func`` / ``grad_dot_layers``: Grad-Dot with ``grad_backend="func"`` / ``"layers"``;
* ``trak_func`` / ``trak_layers``: TRAK, dense Gaussian projection to ``--proj-dim``;
* ``trak_kronecker``: TRAK with ``proj_type="kronecker"`` (``--kron-dim`` per layer).

Each method runs in its own subprocess (peak RSS per process) under ``--timeout``
seconds; ratios to the floor are of wall and CPU time. Not a test; figures go in
docs/benchmarks.md.

    python scripts/bench_first_order.py --timeout 300
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.models.train import correct_probability, make_loss_funcs
from dattri_cli.task import AttributionTask

METHODS = ("floor", "grad_dot_func", "grad_dot_layers", "trak_kronecker", "trak_layers", "trak_func")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, four stages of two basic blocks (64-128-256-512), 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def setup(args: argparse.Namespace) -> tuple:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    g = torch.Generator().manual_seed(1)
    n = args.n_train + args.n_test
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    train = TensorDataset(x[: args.n_train], y[: args.n_train])
    test = TensorDataset(x[args.n_train :], y[args.n_train :])
    return model, train, test


def loaders(args: argparse.Namespace, train: TensorDataset, test: TensorDataset) -> tuple:
    return DataLoader(train, batch_size=args.batch), DataLoader(test, batch_size=args.batch)


def run(method: str, args: argparse.Namespace) -> torch.Tensor:
    model, train, test = setup(args)
    if method == "floor":
        for x, y in list(loaders(args, train, test)[0]) + list(loaders(args, train, test)[1]):
            model.zero_grad(set_to_none=True)
            cross_entropy(model(x), y, reduction="sum").backward()
        return torch.zeros(0)
    loss, target = make_loss_funcs(model, 1e-3, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss, model, [state], target_func=target)
    train_loader, test_loader = loaders(args, train, test)
    backend = "func" if method.endswith("_func") else "layers"
    if method.startswith("grad_dot"):
        attributor = TracInAttributor(task, [1.0], False, grad_backend=backend)
        return attributor.attribute(train_loader, test_loader)
    proj = {"proj_dim": args.proj_dim}
    if method == "trak_kronecker":
        proj = {"proj_type": "kronecker", "proj_dim": args.kron_dim}
    attributor = TRAKAttributor(
        task, correct_probability(model, 3), proj, regularization=1e-4, grad_backend=backend
    )
    attributor.cache(train_loader)
    return attributor.attribute(test_loader)


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, train, _ = setup(args)
    cross_entropy(model(train.tensors[0][:1]), train.tensors[1][:1]).backward()  # kernel set-up
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = run(args.one, args)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(scores, args.scores)
    out = {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak / 1024, "base_mib": base_rss / 1024}
    print(json.dumps(out))


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    rel = float((a - b).abs().max() / b.abs().max())
    x, y = a.flatten() - a.mean(), b.flatten() - b.mean()
    return f"max rel. diff {rel:.1e}, Pearson {float(x @ y / (x.norm() * y.norm())):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--kron-dim", type=int, default=64)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return
    methods = args.methods.split(",")
    n_params = sum(p.numel() for p in ResNet18().parameters())
    results, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            path = Path(tmp) / f"{m}.pt"
            cmd = [sys.executable, __file__, "--one", m, "--scores", str(path)]
            for key in ("n_train", "n_test", "batch", "threads", "proj_dim", "kron_dim"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[m] = f"not done in {args.timeout} s"
                print(f"{m}: {results[m]}", file=sys.stderr, flush=True)
                continue
            if proc.returncode != 0:
                results[m] = f"failed (rc {proc.returncode})"
                print(f"{m} failed: {proc.stderr[-1500:]}", file=sys.stderr, flush=True)
                continue
            results[m] = json.loads(proc.stdout.strip().splitlines()[-1])
            scores[m] = torch.load(path, weights_only=True)  # tensors this script wrote
            print(f"{m}: {results[m]}", file=sys.stderr, flush=True)
    print(
        f"model: CIFAR-style ResNet-18, {n_params:,} parameters, BatchNorm in eval mode; {args.n_train} train / "
        f"{args.n_test} test images 3x32x32, batches of {args.batch}, {args.threads} threads, "
        f"torch {torch.__version__}; TRAK proj_dim {args.proj_dim}, Kronecker {args.kron_dim} per layer"
    )
    floor = results.get("floor") if isinstance(results.get("floor"), dict) else None
    print(
        "| method | wall (s) | x floor | CPU (s) | x floor | peak RSS (MiB) | peak - RSS after setup (MiB) | scores |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for m in methods:
        r = results.get(m)
        if not isinstance(r, dict):
            print(f"| {m} | {r} | | | | | | |")
            continue
        ratio = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "-"
        cpu_ratio = f"{r['cpu_seconds'] / floor['cpu_seconds']:.2f}" if floor else "-"
        ref = {"grad_dot_layers": "grad_dot_func", "trak_layers": "trak_func"}.get(m)
        agree = f"vs {ref}: {agreement(scores[m], scores[ref])}" if ref in scores else "-"
        if m == "trak_kronecker" and "trak_layers" in scores:
            agree = f"vs trak_layers: {agreement(scores[m], scores['trak_layers'])}"
        print(
            f"| {m} | {r['seconds']:.1f} | {ratio} | {r['cpu_seconds']:.1f} | {cpu_ratio} | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] - r['base_mib']:.0f} | {agree} |"
        )


if __name__ == "__main__":
    main()
