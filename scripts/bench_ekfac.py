"""EK-FAC benchmark on digits with the MLP: time and LDS, next to K-FAC, CG, DataInf and TRAK.

    PYTHONPATH=. python scripts/bench_ekfac.py [--subsets 20] [--workers 2] \
        [--dattri /tmp/dattri-venv/bin/python]

LDS comes from the package's own tooling: ``dattri_cli.groundtruth`` retrains the MLP
(the run config ``model=mlp``: same data split, settings and seed) on ``--subsets``
random halves of the training set, as ``dattri groundtruth`` does, and
``dattri_cli.metric.lds`` scores each attributor against it, as ``dattri eval`` does
(mean Spearman over test samples with a bootstrap interval). With few subsets it is
noisy. The ground truth is kept in ``--work-dir`` and reused by later runs.

With ``--dattri PYTHON`` the public dattri's ``IFAttributorEKFAC`` runs in that
interpreter (a separate virtual environment) on the same checkpoint, data and
loss, and is compared for time and score agreement with ours on identical
settings (empirical Fisher, the same fixed damping).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List

import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from dattri_cli import groundtruth, metric
from dattri_cli.algorithm.influence_function import (
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorKFAC,
)
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.data import digits
from dattri_cli.errors import DattriError
from dattri_cli.groundtruth import GroundTruthSettings
from dattri_cli.models import MLP
from dattri_cli.models.train import TrainSettings, correct_probability, make_loss_funcs, train_one
from dattri_cli.task import AttributionTask

SETTINGS = TrainSettings()  # configs/train/default.yaml: 30 epochs, SGD 0.1, momentum 0.9, wd 1e-3
DATTRI_DAMPING = 0.01  # one fixed damping for the side-by-side run (dattri has no automatic one)


#: (n_train, n_test, epochs) of the benchmark and of --smoke (seconds, for the test)
SIZES = {"full": (1000, 200, SETTINGS.epochs), "smoke": (60, 12, 2)}


def build(n_train: int, n_test: int, epochs: int):
    split = digits(n_train=n_train, n_test=n_test, split_seed=0)
    model = MLP(split.num_features, split.num_classes, hidden=(128, 128))
    state = train_one(model, split, replace(SETTINGS, epochs=epochs), seed=0)[-1][1]
    return split, model, state


def attributors(model: nn.Module) -> Dict[str, Callable]:
    cp = correct_probability(model, sample_ndim=1)
    return {
        "if_ekfac (config: auto damping)": lambda t: IFAttributorEKFAC(t, damping=None),
        "if_kfac (config: auto damping)": lambda t: IFAttributorKFAC(t, damping=None),
        f"if_ekfac (empirical, damping {DATTRI_DAMPING})": lambda t: IFAttributorEKFAC(
            t, damping=DATTRI_DAMPING, fisher="empirical"
        ),
        "if_cg (config: 10 it, reg 0)": lambda t: IFAttributorCG(t, max_iter=10, regularization=0.0),
        "if_cg (10 it, reg 0.01)": lambda t: IFAttributorCG(t, max_iter=10, regularization=0.01),
        "if_datainf (config: reg 0.1)": lambda t: IFAttributorDataInf(t, regularization=0.1),
        "trak (config: TRAK-1, 512)": lambda t: TRAKAttributor(t, correct_probability_func=cp),
    }


def groundtruth_overrides(n_train: int, n_test: int, epochs: int) -> List[str]:
    """The run config whose split, model and training build() reproduces (other keys at defaults)."""
    return [
        "model=mlp",
        f"dataset.n_train={n_train}",
        f"dataset.n_test={n_test}",
        f"train.epochs={epochs}",
        "progress=off",
    ]


def retrained_groundtruth(split, sizes, num_subsets: int, workers: int, work_dir: Path):
    """``(subsets, targets)`` from ``dattri_cli.groundtruth`` on random halves of the training set."""
    out = str(work_dir / "groundtruth.safetensors")
    settings = GroundTruthSettings(num_subsets=num_subsets, workers=workers, out=out)
    path = groundtruth.generate(groundtruth.compose(groundtruth_overrides(*sizes)), settings)
    tensors, _ = groundtruth.load_groundtruth(path)
    if not torch.equal(tensors["train_indices"], split.train_indices.to(torch.int64)):
        raise SystemExit("the ground truth's training rows differ from build()'s split")
    return tensors["subsets"], tensors["targets"]


DATTRI_SIDE = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask
    blob = torch.load(sys.argv[1])
    sizes, wd, damping = blob["sizes"], blob["weight_decay"], blob["damping"]
    layers, width = [], sizes[0]
    for h in sizes[1:-1]:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, sizes[-1])
        def forward(self, x):
            return self.head(self.body(x.flatten(1)))
    model = MLP()
    model.load_state_dict(blob["state"])
    model.eval()
    def loss_func(params, batch):
        x, y = batch
        logits = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y) + 0.5 * wd * sum((p * p).sum() for p in params.values())
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=blob["state"])
    train = DataLoader(TensorDataset(blob["x_train"], blob["y_train"]), batch_size=64)
    test = DataLoader(TensorDataset(blob["x_test"], blob["y_test"]), batch_size=64)
    start = time.perf_counter()
    attributor = IFAttributorEKFAC(task=task, device="cpu", damping=damping)
    attributor.cache(train)
    scores = attributor.attribute(train, test)
    elapsed = time.perf_counter() - start
    torch.save({"scores": scores.detach(), "time": elapsed}, sys.argv[2])
    """
)


def run_dattri(python: str, split, state, tmp: Path):
    sizes = [split.num_features, 128, 128, split.num_classes]
    blob = {
        "sizes": sizes,
        "weight_decay": SETTINGS.weight_decay,
        "damping": DATTRI_DAMPING,
        "state": state,
        "x_train": split.x_train,
        "y_train": split.y_train,
        "x_test": split.x_test,
        "y_test": split.y_test,
    }
    torch.save(blob, tmp / "in.pt")
    (tmp / "side.py").write_text(DATTRI_SIDE)
    subprocess.run([python, str(tmp / "side.py"), str(tmp / "in.pt"), str(tmp / "out.pt")], check=True)
    out = torch.load(tmp / "out.pt")
    return out["scores"], out["time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--dattri", default=None, help="python of a venv with dattri 0.3.0 installed")
    parser.add_argument("--only", default=None, help="substring: run only the matching attributors")
    parser.add_argument("--workers", type=int, default=1, help="processes for the retrainings")
    parser.add_argument("--work-dir", default="/tmp/bench_ekfac", help="where the ground truth is kept")
    parser.add_argument("--smoke", action="store_true", help="60 train / 12 test, 2 epochs (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = SIZES["smoke" if args.smoke else "full"]
    split, model, state = build(*sizes)
    loss_func, target_func = make_loss_funcs(model, SETTINGS.weight_decay, split.x_train.dim() - 1)
    train_loader, test_loader = split.loaders(64, 64)
    results, all_scores = {}, {}
    for name, make in attributors(model).items():
        if args.only and args.only not in name:
            continue
        task = AttributionTask(
            loss_func, model, {k: v.clone() for k, v in state.items()}, target_func=target_func
        )
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            attributor = make(task)
            attributor.cache(train_loader)
            if isinstance(attributor, TRAKAttributor):  # TRAK's attribute(test, train=None) order
                scores = attributor.attribute(test_loader)
            else:
                scores = attributor.attribute(train_loader, test_loader)
            scores = scores.detach().double()
        except DattriError as exc:  # e.g. CG without regularization on an indefinite Hessian
            print(f"{name:40s} failed: {exc}", flush=True)
            continue
        results[name] = {"time": time.perf_counter() - start}
        all_scores[name] = scores
        print(f"{name:40s} {results[name]['time']:8.2f} s", flush=True)
    if args.dattri:
        with tempfile.TemporaryDirectory() as tmp:
            d_scores, d_time = run_dattri(args.dattri, split, state, Path(tmp))
        name = f"dattri 0.3.0 IFAttributorEKFAC (damping {DATTRI_DAMPING})"
        results[name] = {"time": d_time}
        all_scores[name] = d_scores.double()
        ours = all_scores.get(f"if_ekfac (empirical, damping {DATTRI_DAMPING})")
        if ours is not None:
            a, b = ours.flatten().numpy(), d_scores.double().flatten().numpy()
            print(
                f"dattri vs ours (same settings): pearson {pearsonr(a, b).statistic:.4f}, "
                f"spearman {spearmanr(a, b).statistic:.4f}, rel. diff "
                f"{float((ours - d_scores.double()).norm() / d_scores.double().norm()):.3g}"
            )
    start = time.perf_counter()
    subsets, targets = retrained_groundtruth(split, sizes, args.subsets, args.workers, Path(args.work_dir))
    print(f"ground truth: {args.subsets} retrainings on random halves in {time.perf_counter() - start:.1f} s")
    print(f"\n{'attributor':52s} {'time [s]':>9s} {'LDS':>7s} {'95% CI':>16s}")
    for name, scores in all_scores.items():
        res = metric.lds(scores.float(), subsets, targets)
        results[name].update(lds=res.mean, ci=[res.ci_low, res.ci_high])
        ci = f"[{res.ci_low:6.3f}, {res.ci_high:6.3f}]"
        print(f"{name:52s} {results[name]['time']:9.2f} {res.mean:7.4f} {ci:>16s}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
