"""Run every influence-function solver on one small workload and compare with Explicit.

In-process and self-contained (synthetic data, a small MLP trained to a minimum of
its L2-regularised loss, so the Hessian is positive definite). Prints one table:
cache+attribute wall time, relative error and rank agreement against Explicit.

    python scripts/sweep_solvers.py [--train 500] [--test 50]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import torch
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorKFAC,
    IFAttributorLiSSA,
)
from dattri_cli.task import AttributionTask

WEIGHT_DECAY = 0.01
# an MLP's Hessian has eigenvalues near zero even at a minimum: regularise every solver alike
REG = 0.01


def build(num_train: int, num_test: int, seed: int = 0) -> tuple:
    """A trained 16-32-4 MLP, its task and the train/test datasets."""
    torch.manual_seed(seed)
    x = torch.randn(num_train + num_test, 16)
    y = (x[:, :4] + 0.5 * torch.randn(num_train + num_test, 4)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))

    def loss_func(params: dict, batch: tuple) -> torch.Tensor:
        inputs, labels = batch
        l2 = sum((p * p).sum() for p in params.values())
        return cross_entropy(functional_call(model, params, (inputs,)), labels) + 0.5 * WEIGHT_DECAY * l2

    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_func(dict(model.named_parameters()), (x[:num_train], y[:num_train]))
        loss.backward()
        return loss

    opt.step(closure)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func, model, state)
    return task, TensorDataset(x[:num_train], y[:num_train]), TensorDataset(x[num_train:], y[num_train:])


def solvers() -> Dict[str, Callable]:
    """Constructors, all regularised by REG (LiSSA: damping * scaling = REG)."""
    return {
        "explicit": lambda t: IFAttributorExplicit(t, regularization=REG),
        "cg (10 it)": lambda t: IFAttributorCG(t, max_iter=10, regularization=REG),
        "cg (100 it)": lambda t: IFAttributorCG(t, max_iter=100, tol=1e-6, regularization=REG),
        "cg rev-fwd (100 it)": lambda t: IFAttributorCG(
            t, max_iter=100, tol=1e-6, mode="rev-fwd", regularization=REG
        ),
        "lissa (bs 64, 500)": lambda t: IFAttributorLiSSA(
            t, batch_size=64, recursion_depth=500, damping=REG / 5.0, scaling=5.0
        ),
        "arnoldi (k=100)": lambda t: IFAttributorArnoldi(t, proj_dim=100, max_iter=200, regularization=REG),
        "datainf (reg 0.1)": lambda t: IFAttributorDataInf(t, regularization=0.1),
        # the Gauss-Newton factors leave out the L2 term's curvature (WEIGHT_DECAY * I): damp by it too
        "ekfac (damping reg+wd)": lambda t: IFAttributorEKFAC(t, damping=REG + WEIGHT_DECAY),
        "kfac (damping reg+wd)": lambda t: IFAttributorKFAC(t, damping=REG + WEIGHT_DECAY),
        "ekfac (auto damping)": lambda t: IFAttributorEKFAC(t, damping=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=50)
    args = parser.parse_args()
    task, train, test = build(args.train, args.test)
    num_params = sum(p.numel() for p in task.get_model().parameters())
    print(f"workload: MLP 16-32-4 ({num_params} parameters), {args.train} train / {args.test} test")
    reference = None
    print(f"{'solver':22s} {'time [s]':>9s} {'rel. error':>11s} {'spearman':>9s}")
    for name, make in solvers().items():
        torch.manual_seed(0)
        attributor = make(task)
        start = time.perf_counter()
        attributor.cache(DataLoader(train, batch_size=128))
        scores = attributor.attribute(DataLoader(train, batch_size=128), DataLoader(test, batch_size=64))
        elapsed = time.perf_counter() - start
        if reference is None:
            reference = scores
        rel = float((scores - reference).norm() / reference.norm())
        rho = spearmanr(scores.flatten().numpy(), reference.flatten().numpy()).statistic
        print(f"{name:22s} {elapsed:9.2f} {rel:11.2e} {rho:9.4f}")


if __name__ == "__main__":
    main()
