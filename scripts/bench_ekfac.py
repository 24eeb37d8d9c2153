"""EK-FAC benchmark on digits with the MLP: time and a quick LDS estimate, next to CG, DataInf, TRAK.

    PYTHONPATH=. python scripts/bench_ekfac.py [--subsets 20] [--dattri /tmp/dattri-venv/bin/python]

The LDS here is a QUICK ESTIMATE, not the project's evaluation tooling: the MLP is
retrained (same seed, same settings) on ``--subsets`` random halves of the
training set; for each test sample, the Spearman correlation between the
predicted loss ``-sum(scores over the subset)`` and the retrained model's test
loss, averaged over test samples. With few subsets it is noisy (report +- its
standard error over test samples).

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
from pathlib import Path
from typing import Callable, Dict

import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from dattri_cli.algorithm.influence_function import (
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorKFAC,
)
from dattri_cli.algorithm.trak import TRAKAttributor
from dattri_cli.data import digits
from dattri_cli.errors import DattriError
from dattri_cli.models import MLP
from dattri_cli.models.train import TrainSettings, correct_probability, make_loss_funcs, train_one
from dattri_cli.task import AttributionTask

SETTINGS = TrainSettings()  # configs/train/default.yaml: 30 epochs, SGD 0.1, momentum 0.9, wd 1e-3
DATTRI_DAMPING = 0.01  # one fixed damping for the side-by-side run (dattri has no automatic one)


def build():
    split = digits(n_train=1000, n_test=200, split_seed=0)
    model = MLP(split.num_features, split.num_classes, hidden=(128, 128))
    state = train_one(model, split, SETTINGS, seed=0)[-1][1]
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


def test_losses_after_retraining(split, model, subsets):
    """``(num_subsets, num_test)`` test losses of the MLP retrained on each subset."""
    out = []
    for idx in subsets:
        sub = type(split)(
            split.name,
            split.x_train[idx],
            split.y_train[idx],
            split.x_test,
            split.y_test,
            split.train_indices[idx],
            split.test_indices,
        )
        state = train_one(model, sub, SETTINGS, seed=0)[-1][1]
        model.load_state_dict(state)
        with torch.no_grad():
            out.append(nn.functional.cross_entropy(model(split.x_test), split.y_test, reduction="none"))
    return torch.stack(out)


def quick_lds(scores: torch.Tensor, subsets, losses: torch.Tensor):
    masks = torch.zeros(len(subsets), scores.shape[0], dtype=scores.dtype)
    for k, idx in enumerate(subsets):
        masks[k, idx] = 1.0
    predicted = -(masks @ scores)  # (num_subsets, num_test): more helpful samples in, lower loss
    rhos = torch.tensor(
        [spearmanr(predicted[:, j].numpy(), losses[:, j].numpy()).statistic for j in range(scores.shape[1])]
    )
    rhos = rhos[torch.isfinite(rhos)]
    return float(rhos.mean()), float(rhos.std() / len(rhos) ** 0.5)


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
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    split, model, state = build()
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
    gen = torch.Generator().manual_seed(1)
    n = split.x_train.shape[0]
    subsets = [torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(args.subsets)]
    start = time.perf_counter()
    losses = test_losses_after_retraining(split, model, subsets)
    print(f"retrained {args.subsets} models on random halves in {time.perf_counter() - start:.1f} s")
    print(f"\n{'attributor':52s} {'time [s]':>9s} {'quick LDS':>10s} {'+-se':>6s}")
    for name, scores in all_scores.items():
        lds, se = quick_lds(scores.float().double(), subsets, losses.double())
        results[name].update(lds=lds, se=se)
        print(f"{name:52s} {results[name]['time']:9.2f} {lds:10.4f} {se:6.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
