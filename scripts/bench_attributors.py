"""Benchmark our attributors side by side with the public dattri 0.3.0 library.

Both implementations get identical inputs: the same data and checkpoint files
(trained once, deterministically, with our training code and saved to a work
directory), the same hyperparameters, the same data loaders and the same torch
thread count. Every (workload, attributor, side, repetition) runs in a fresh
subprocess, alternating ours / dattri, so peak RSS (``ru_maxrss``) is per run.
dattri lives in its own virtual environment and is never imported by our code.

    python scripts/bench_attributors.py                       # digits LR + MLP, 3 reps
    python scripts/bench_attributors.py --workloads synthetic_big --reps 1
    python scripts/bench_attributors.py --smoke --no-dattri   # seconds; used by the tests

Writes ``<out>.json``, ``<out>.md`` and (with matplotlib) ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATTRI_PYTHON = "/tmp/dattri-venv/bin/python"
WEIGHT_DECAY = 1e-3
IF_REG = 0.01  # regularisation of every IF solver on both sides (MLP Hessians are not PD)

# --------------------------------------------------------------------------------------
# workloads: data, model, loaders (shared by both sides; no dattri_cli import needed here)


class BenchLR(nn.Module):
    """Logistic regression with our built-in model's parameter names."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class BenchMLP(nn.Module):
    """ReLU MLP; the final linear layer is the top-level attribute ``head`` (RPS needs that)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Tuple[int, ...]) -> None:
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


WORKLOADS: Dict[str, Dict[str, Any]] = {
    "digits_lr": {"data": "digits", "n_train": 1000, "n_test": 200, "model": "lr", "hidden": ()},
    "digits_mlp": {"data": "digits", "n_train": 1000, "n_test": 200, "model": "mlp", "hidden": (128, 128)},
    "synthetic_big": {
        "data": "synthetic",
        "n_train": 10000,
        "n_test": 1000,
        "n_features": 100,
        "n_classes": 10,
        "model": "mlp",
        "hidden": (256, 256),
    },
    # 60 training samples: a TRAK kernel of at most 60 projected dimensions
    "smoke": {
        "data": "digits",
        "n_train": 60,
        "n_test": 12,
        "model": "lr",
        "hidden": (),
        "trak_proj_dim": 32,
    },
}
DEFAULT_WORKLOADS = ["digits_lr", "digits_mlp"]
MAX_LOADER_BATCH = 1000  # attribute-time loader batch size: min(n, this), both sides

# Attributor settings, identical on both sides. "lr_only" ones need a small P.
ATTRIBUTORS: Dict[str, Dict[str, Any]] = {
    "if_explicit": {"kwargs": {"regularization": IF_REG}, "lr_only": True, "deterministic": True},
    "if_cg": {
        "kwargs": {"max_iter": 10, "tol": 1e-7, "regularization": IF_REG},
        "deterministic": True,
        "floor": {"hvp_steps": 10},
    },
    "if_lissa": {
        # damping * scaling = 0.01 (= IF_REG); batches of 32, depth 100; random minibatches
        "kwargs": {
            "batch_size": 32,
            "num_repeat": 1,
            "recursion_depth": 100,
            "damping": IF_REG / 50.0,
            "scaling": 50.0,
        },
        "deterministic": False,
        "floor": {"hvp_steps": 100, "hvp_batch": 32},
    },
    # the Grad-Dot floor (train and test per-sample gradients) bounds every gradient-based method
    "if_arnoldi": {
        "kwargs": {"proj_dim": 100, "max_iter": 100, "regularization": IF_REG, "seed": 0},
        "deterministic": True,
        "floor": {},
    },
    "if_datainf": {"kwargs": {"regularization": 0.1}, "deterministic": True},
    "tracin": {"kwargs": {"normalized_grad": False}, "trajectory": True, "deterministic": True},
    "grad_dot": {"kwargs": {"normalized_grad": False}, "deterministic": True, "floor": {}},
    "grad_cos": {"kwargs": {"normalized_grad": True}, "deterministic": True},
    "trak_proj": {
        "proj": {"proj_dim": 512, "proj_type": "normal", "proj_seed": 0},
        "deterministic": False,
        "floor": {"proj_dim": 512},
    },
    "trak_identity": {"proj": {"proj_type": "identity"}, "lr_only": True, "deterministic": True},
    "rps": {"kwargs": {"l2_strength": 0.003, "epoch": 3000}, "deterministic": True},
    # dattri's EK-FAC fits the empirical Fisher with a fixed damping: ours is told to do the same
    "if_ekfac": {"kwargs": {"damping": 0.01}, "ours_kwargs": {"fisher": "empirical"}, "deterministic": True},
}
DEFAULT_ATTRIBUTORS = list(ATTRIBUTORS)
TARGETS = {  # minimum speed-up dattri/ours
    "if_cg": 10,
    "if_lissa": 10,
    "if_arnoldi": 10,
    "if_datainf": 10,
    "tracin": 2,
    "grad_dot": 2,
    "grad_cos": 2,
    "trak_proj": 2,
    "trak_identity": 2,
    "rps": 2,
    "if_ekfac": 2,
}


def make_model(spec: Dict[str, Any], in_features: int, num_classes: int) -> nn.Module:
    if spec["model"] == "lr":
        return BenchLR(in_features, num_classes)
    return BenchMLP(in_features, num_classes, tuple(spec["hidden"]))


def final_layer(spec: Dict[str, Any]) -> str:
    return "linear" if spec["model"] == "lr" else "head"


def load_files(
    work: Path, workload: str
) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]], Dict[str, Any]]:
    """Data tensors, checkpoints (trajectory order, last = final) and the manifest."""
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = work / workload
    manifest = json.loads((folder / "manifest.json").read_text())
    data = load_file(str(folder / "data.safetensors"))
    ckpts = [load_file(str(folder / c["file"])) for c in manifest["checkpoints"]]
    return data, ckpts, manifest


def loaders(data: Dict[str, Tensor], max_batch: int = MAX_LOADER_BATCH) -> Dict[str, Any]:
    """Unshuffled loaders: attribute-time train/test, and the single-batch full-train loader.

    IF classes in dattri 0.3.0 apply the solver to each batch of the full-train loader
    and *sum* the results, so only a single-batch loader gives the Hessian of the mean
    loss over the whole training set (what ours computes however it is batched).
    """
    from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

    train = TensorDataset(data["x_train"], data["y_train"])
    test = TensorDataset(data["x_test"], data["y_test"])
    n_train, n_test = len(train), len(test)
    return {
        "train": DataLoader(train, batch_size=min(n_train, max_batch), shuffle=False),
        "test": DataLoader(test, batch_size=min(n_test, max_batch), shuffle=False),
        "full_train_one_batch": DataLoader(train, batch_size=n_train, shuffle=False),
    }


# --------------------------------------------------------------------------------------
# preparation (ours): data + checkpoints trained once, deterministically


def prepare(work: Path, workload: str) -> Dict[str, Any]:
    """Build the data, train the checkpoints with our training code, save files; reuse if present."""
    folder = work / workload
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file  # noqa: PLC0415

    from dattri_cli import data as cli_data  # noqa: PLC0415
    from dattri_cli.models.train import TrainSettings, train_one  # noqa: PLC0415

    spec = WORKLOADS[workload]
    if spec["data"] == "digits":
        split = cli_data.digits(n_train=spec["n_train"], n_test=spec["n_test"], split_seed=0)
    else:
        n = spec["n_train"] + spec["n_test"]
        split = cli_data.synthetic(
            n_samples=n,
            n_features=spec["n_features"],
            n_classes=spec["n_classes"],
            seed=0,
            n_train=spec["n_train"],
            n_test=spec["n_test"],
            split_seed=0,
        )
    epochs = 4 if workload == "smoke" else 30
    settings = TrainSettings(
        epochs=epochs,
        lr=0.1,
        momentum=0.9,
        batch_size=64,
        weight_decay=WEIGHT_DECAY,
        save_every=max(1, epochs // 3),
    )
    torch.manual_seed(0)
    model = make_model(spec, split.num_features, split.num_classes)
    kept = train_one(model, split, settings, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "x_train": split.x_train.contiguous(),
            "y_train": split.y_train.contiguous(),
            "x_test": split.x_test.contiguous(),
            "y_test": split.y_test.contiguous(),
        },
        str(folder / "data.safetensors"),
    )
    ckpts = []
    for epoch, state in kept:
        name = f"epoch{epoch:04d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
        ckpts.append({"file": name, "epoch": epoch, "lr": settings.lr})
    num_params = sum(p.numel() for p in model.parameters())
    manifest = {
        "workload": workload,
        "spec": spec,
        "checkpoints": ckpts,
        "num_params": num_params,
        "in_features": split.num_features,
        "num_classes": split.num_classes,
        "train": settings.__dict__,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


# --------------------------------------------------------------------------------------
# loss functions, written for each library's calling convention


def loss_funcs(model: nn.Module, unsqueeze: bool) -> Tuple[Callable, Callable, Callable]:
    """(train loss = CE + L2, test target = CE, p(correct)) as ``f(params_dict, data)``.

    Both libraries' IF classes pass a batch with a leading dimension (one sample is a
    batch of one); their TracIn / TRAK vmap over dim 0 without a batch dimension, so
    there ``unsqueeze`` adds it back. The same functions serve both sides. Labels are cast to long because dattri's LiSSA
    collate function turns every data tensor into float.
    """
    from torch.func import functional_call  # noqa: PLC0415
    from torch.nn.functional import cross_entropy  # noqa: PLC0415

    def _xy(data: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        x, y = data
        if unsqueeze:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return x, y.long()

    def target(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = _xy(data)
        return cross_entropy(functional_call(model, params, (x,)), y)

    def loss(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        l2 = sum((p * p).sum() for p in params.values())
        return target(params, data) + 0.5 * WEIGHT_DECAY * l2

    def correct_probability(params: Dict[str, Tensor], data: Tuple[Tensor, Tensor]) -> Tensor:
        return torch.exp(-target(params, data))

    return loss, target, correct_probability


def soft_ce(logits: Tensor, probs: Tensor) -> Tensor:
    """Mean cross-entropy with soft targets (the RPS fine-tuning loss on both sides)."""
    return -(probs * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------
# one run (in a fresh process)


def build_attributor(
    side: str,
    name: str,
    spec: Dict[str, Any],
    model: nn.Module,
    ckpts: List[Dict[str, Tensor]],
    manifest: Dict[str, Any],
) -> Tuple[Any, Callable[[Dict], Tensor]]:
    """The attributor of ``side`` and a function running cache + attribute on the loaders."""
    conf = ATTRIBUTORS[name]
    kwargs = dict(conf.get("kwargs", {}))
    if side == "ours":
        kwargs.update(conf.get("ours_kwargs", {}))
        sys.path.insert(0, str(REPO))
        from dattri_cli.algorithm import influence_function as inf  # noqa: PLC0415
        from dattri_cli.algorithm.rps import RPSAttributor  # noqa: PLC0415
        from dattri_cli.algorithm.tracin import TracInAttributor  # noqa: PLC0415
        from dattri_cli.algorithm.trak import TRAKAttributor  # noqa: PLC0415
        from dattri_cli.task import AttributionTask  # noqa: PLC0415
    else:
        from dattri.algorithm import influence_function as inf  # noqa: PLC0415
        from dattri.algorithm.rps import RPSAttributor  # noqa: PLC0415
        from dattri.algorithm.tracin import TracInAttributor  # noqa: PLC0415
        from dattri.algorithm.trak import TRAKAttributor  # noqa: PLC0415
        from dattri.task import AttributionTask  # noqa: PLC0415

    # both libraries call TracIn / TRAK functions on samples without a batch dimension
    unsqueeze = name.startswith("trak") or name in ("tracin", "grad_dot", "grad_cos")
    loss, target, correct_probability = loss_funcs(model, unsqueeze)
    final = ckpts[-1]
    if name.startswith("if_"):
        task = AttributionTask(loss_func=loss, model=model, checkpoints=final, target_func=target)
        cls = {
            "if_explicit": inf.IFAttributorExplicit,
            "if_cg": inf.IFAttributorCG,
            "if_lissa": inf.IFAttributorLiSSA,
            "if_arnoldi": inf.IFAttributorArnoldi,
            "if_datainf": inf.IFAttributorDataInf,
            "if_ekfac": inf.IFAttributorEKFAC,
        }[name]
        attributor = cls(task, device="cpu", **kwargs)

        def run(ld: Dict) -> Tensor:
            attributor.cache(ld["full_train_one_batch"])
            return attributor.attribute(ld["train"], ld["test"])

        return attributor, run
    if name in ("tracin", "grad_dot", "grad_cos"):
        chosen = ckpts if name == "tracin" else [final]
        weights = [c["lr"] for c in manifest["checkpoints"]] if name == "tracin" else [1.0]
        task = AttributionTask(loss_func=loss, model=model, checkpoints=chosen, target_func=target)
        # exact gradients on both sides: dattri 0.3.0 always projects (its projector_kwargs
        # start from a non-None default), so it gets the identity projection
        proj = None if side == "ours" else {"proj_type": "identity"}
        attributor = TracInAttributor(
            task, weight_list=torch.tensor(weights), projector_kwargs=proj, device="cpu", **kwargs
        )

        def run(ld: Dict) -> Tensor:
            attributor.cache()
            return attributor.attribute(ld["train"], ld["test"])

        return attributor, run
    if name.startswith("trak"):
        task = AttributionTask(loss_func=loss, model=model, checkpoints=final, target_func=target)
        proj = dict(conf["proj"], proj_max_batch_size=128)  # our default (dattri's CPU projector ignores it)
        if "trak_proj_dim" in spec and proj["proj_type"] != "identity":
            proj["proj_dim"] = spec["trak_proj_dim"]
        if proj["proj_type"] == "identity":
            proj["proj_dim"] = manifest["num_params"]
        attributor = TRAKAttributor(
            task, correct_probability_func=correct_probability, projector_kwargs=proj, device="cpu"
        )

        def run(ld: Dict) -> Tensor:
            attributor.cache(ld["train"])
            return attributor.attribute(ld["test"])

        return attributor, run
    if name == "rps":
        # RPS fine-tunes with the task's target function of (pre-activations, soft labels)
        task = AttributionTask(loss_func=soft_ce, model=model, checkpoints=final, target_func=soft_ce)
        attributor = RPSAttributor(task, final_linear_layer_name=final_layer(spec), device="cpu", **kwargs)

        def run(ld: Dict) -> Tensor:
            attributor.cache(ld["train"])
            return attributor.attribute(ld["train"], ld["test"])

        return attributor, run
    msg = f"unknown attributor {name}"
    raise ValueError(msg)


def floor_seconds(model: nn.Module, ckpt: Dict[str, Tensor], ld: Dict, floor: Dict[str, Any]) -> float:
    """Seconds of the work any implementation must do, written as plainly as possible.

    Always: one batched per-sample-gradient pass over train and test plus the score
    product (the Grad-Dot floor). ``floor["proj_dim"]`` (TRAK): one Gaussian
    ``P x proj_dim`` matrix, every gradient projected in one large float32 product
    (the fastest way to multiply, ignoring batch-size invariance), the float32 kernel
    ``Phi^T Phi`` and one solve. ``floor["hvp_steps"]`` (CG, LiSSA): that many
    Hessian-vector products of all test vectors at once (forward-over-reverse, vmapped
    over the vectors) on the whole training batch, or on ``floor["hvp_batch"]`` random
    training samples per step: the products a solver with these hyperparameters needs.
    """
    from torch.func import grad, jvp, vmap  # noqa: PLC0415

    model.load_state_dict(ckpt)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss, target, _ = loss_funcs(model, unsqueeze=False)

    def flat_grads(func: Callable, loader: Any) -> Tensor:
        per_sample = vmap(grad(func), in_dims=(None, 0))
        rows = []
        for x, y in loader:
            g = per_sample(params, (x.unsqueeze(1), y.unsqueeze(1)))
            rows.append(torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1))
        return torch.cat(rows)

    def hvps(vectors: Tensor, data: Tuple[Tensor, Tensor]) -> Tensor:
        sizes = [p.numel() for p in params.values()]

        def one(vector: Tensor) -> Tensor:
            tangent = {k: t.view_as(p) for (k, p), t in zip(params.items(), vector.split(sizes))}
            _, out = jvp(lambda q: grad(loss)(q, data), (params,), (tangent,))
            return torch.cat([t.reshape(-1) for t in out.values()])

        return vmap(one)(vectors)

    start = time.perf_counter()
    train, test = flat_grads(loss, ld["train"]), flat_grads(target, ld["test"])
    if floor.get("proj_dim"):
        sketch = torch.randn(train.shape[1], floor["proj_dim"])
        phi = torch.cat([train, test]) @ sketch
        phi_train, phi_test = phi[: train.shape[0]], phi[train.shape[0] :]
        scores = phi_train @ torch.linalg.solve(phi_train.T @ phi_train, phi_test.T)
    else:
        solved = test
        x_all, y_all = ld["train"].dataset.tensors
        for _ in range(int(floor.get("hvp_steps", 0))):
            picked = (
                torch.randperm(len(x_all))[: floor["hvp_batch"]] if floor.get("hvp_batch") else slice(None)
            )
            solved = hvps(solved, (x_all[picked], y_all[picked]))
            solved = solved / solved.norm(dim=1, keepdim=True).clamp_min(1e-30)  # keep the values in range
        scores = train @ solved.T
    elapsed = time.perf_counter() - start
    assert scores.shape[0] == len(ld["train"].dataset)
    return elapsed


def warm_up() -> None:
    """Trigger torch's lazy imports (torch.func, autograd transforms) outside the timed region.

    The first ``grad``/``vmap``/``jvp`` call in a process imports a second of torch
    modules; whichever library happened to import them at import time would look
    faster otherwise. Done identically on both sides.
    """
    from torch.func import grad, jvp, vmap  # noqa: PLC0415

    lin = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def f(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(lin, p, (x,)).square().mean()

    x = torch.randn(4, 1, 3)
    vmap(grad(f), in_dims=(None, 0))(params, x)
    jvp(lambda p: grad(f)(p, x[0]), (params,), (params,))
    torch.linalg.cholesky(torch.eye(2, dtype=torch.float64))
    torch.linalg.eigh(torch.eye(2, dtype=torch.float64))


def worker(job: Dict[str, Any]) -> None:
    """Run one (workload, attributor, side) and write its result JSON (and scores)."""
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    work = Path(job["work"])
    data, ckpts, manifest = load_files(work, job["workload"])
    spec = WORKLOADS[job["workload"]]
    model = make_model(spec, manifest["in_features"], manifest["num_classes"])
    model.load_state_dict(ckpts[-1])
    model.eval()
    ld = loaders(data, job.get("loader_batch", MAX_LOADER_BATCH))
    torch.manual_seed(0)
    _, run = build_attributor(job["side"], job["attributor"], spec, model, ckpts, manifest)
    warm_up()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scores = run(ld)
    elapsed = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = torch.as_tensor(scores).detach().to(torch.float32).cpu()
    result = {
        "seconds": elapsed,
        "peak_rss_mib": rss_peak / 1024.0,
        "rss_before_mib": rss_before / 1024.0,
        "shape": list(scores.shape),
        "finite": bool(torch.isfinite(scores).all()),
    }
    if job.get("floor") is not None:
        result["floor_seconds"] = floor_seconds(model, ckpts[-1], ld, job["floor"])
    if job.get("scores_path"):
        torch.save(scores, job["scores_path"])
    Path(job["result_path"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------
# orchestration


def run_job(python: str, job: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Run one job in a fresh interpreter; returns its result or an error record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) if job["side"] == "ours" else ""
    env.update({"OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])})
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    path = Path(job["result_path"])
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(path.read_text())


def agreement(a: Tensor, b: Tensor) -> Dict[str, Optional[float]]:
    """Pearson and Spearman over all entries, and the mean Spearman per test column."""
    from scipy.stats import pearsonr, spearmanr  # noqa: PLC0415

    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"pearson": None, "spearman": None, "spearman_per_test_mean": None}
    x, y = a.double().numpy(), b.double().numpy()
    cols = [spearmanr(x[:, j], y[:, j]).statistic for j in range(x.shape[1])]
    cols = [c for c in cols if c == c]  # constant columns give NaN
    return {
        "pearson": float(pearsonr(x.ravel(), y.ravel()).statistic),
        "spearman": float(spearmanr(x.ravel(), y.ravel()).statistic),
        "spearman_per_test_mean": float(sum(cols) / len(cols)) if cols else None,
    }


def find_dattri_python(path: str) -> Optional[str]:
    """The venv's python if it imports dattri; else try to create the venv there; else None."""
    probe = [
        path,
        "-c",
        "import dattri, tqdm; print(dattri.__version__ if hasattr(dattri, '__version__') else '0.3.0')",
    ]
    try:
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False).returncode == 0
    except OSError:
        ok = False
    if ok:
        return path
    venv = Path(path).parent.parent
    if Path(path).exists() or path != DEFAULT_DATTRI_PYTHON:
        return None
    print(f"creating a separate venv for dattri 0.3.0 at {venv} (never a dependency of ours)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pip = [path, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", "dattri==0.3.0"], check=True)
        subprocess.run([*pip, "tqdm"], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"could not create the dattri venv: {exc}", flush=True)
        return None
    return path if subprocess.run(probe, capture_output=True, check=False).returncode == 0 else None


def summarize(rows: List[Dict[str, Any]]) -> None:
    """Medians and ratios per row (in place)."""
    for row in rows:
        for side in ("ours", "dattri"):
            runs = [r for r in row["runs"][side] if "error" not in r]
            row[side] = {
                "seconds_median": statistics.median(r["seconds"] for r in runs) if runs else None,
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs) if runs else None,
                "rss_increase_mib_max": max(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs)
                if runs
                else None,
                "errors": [r["error"] for r in row["runs"][side] if "error" in r],
            }
        o, d = row["ours"], row["dattri"]
        row["time_ratio"] = (
            d["seconds_median"] / o["seconds_median"] if o["seconds_median"] and d["seconds_median"] else None
        )
        row["rss_ratio"] = (
            d["peak_rss_mib_max"] / o["peak_rss_mib_max"]
            if o["peak_rss_mib_max"] and d["peak_rss_mib_max"]
            else None
        )
        floors = [r["floor_seconds"] for r in row["runs"]["ours"] if "floor_seconds" in r]
        row["floor_seconds_median"] = statistics.median(floors) if floors else None
        if floors and o["seconds_median"]:
            row["ours_over_floor"] = o["seconds_median"] / row["floor_seconds_median"]
        if floors and d["seconds_median"]:  # the largest ratio any implementation could show
            row["dattri_over_floor"] = d["seconds_median"] / row["floor_seconds_median"]
        target = TARGETS.get(row["attributor"])
        row["time_target"] = target
        row["time_target_met"] = (
            None if row["time_ratio"] is None or target is None else row["time_ratio"] >= target
        )


def fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = (
        "| workload | attributor | ours [s] | dattri [s] | time dattri/ours | target | ours RSS [MiB] "
        "| dattri RSS [MiB] | RSS dattri/ours | Pearson | Spearman | per-test Spearman | notes |"
    )
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        ag = r.get("agreement") or {}
        notes = []
        if r.get("ours_over_floor") is not None:
            notes.append(f"ours = {r['ours_over_floor']:.2f}x floor ({r['floor_seconds_median']:.3f} s)")
        if r.get("dattri_over_floor") is not None:
            notes.append(f"dattri = {r['dattri_over_floor']:.2f}x floor")
        if not ATTRIBUTORS[r["attributor"]]["deterministic"]:
            notes.append("random: statistical agreement only")
        for side in ("ours", "dattri"):
            for err in sorted(set(r[side]["errors"])):
                notes.append(f"{side}: {err}")
        if r.get("dattri_skipped"):
            notes.append(f"dattri: {r['dattri_skipped']}")
        target = (
            ""
            if r["time_target"] is None
            else (
                f">= {r['time_target']}x "
                + ("met" if r["time_target_met"] else "MISSED" if r["time_target_met"] is False else "")
            )
        )
        lines.append(
            f"| {r['workload']} | {r['attributor']} | {fmt(r['ours']['seconds_median'], '.3f')} | "
            f"{fmt(r['dattri']['seconds_median'], '.3f')} | {fmt(r['time_ratio'], '.1f', 'x')} | {target.strip()} | "
            f"{fmt(r['ours']['peak_rss_mib_max'], '.0f')} | {fmt(r['dattri']['peak_rss_mib_max'], '.0f')} | "
            f"{fmt(r['rss_ratio'], '.2f', 'x')} | {fmt(ag.get('pearson'), '.4f')} | {fmt(ag.get('spearman'), '.4f')} | "
            f"{fmt(ag.get('spearman_per_test_mean'), '.4f')} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def bar_chart(rows: List[Dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    shown = [r for r in rows if r["time_ratio"] is not None]
    if not shown:
        return False
    labels = [f"{r['workload']}\n{r['attributor']}" for r in shown]
    xs = range(len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(shown)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["time_ratio"] for r in shown], width=0.4, label="time dattri / ours")
    ax.bar(
        [x + 0.2 for x in xs], [r["rss_ratio"] or 0 for r in shown], width=0.4, label="peak RSS dattri / ours"
    )
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("ratio (higher: ours better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated among {', '.join(w for w in WORKLOADS if w != 'smoke')}",
    )
    parser.add_argument("--attributors", default=",".join(DEFAULT_ATTRIBUTORS), help="comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side (alternating ours, dattri)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument(
        "--loader-batch",
        type=int,
        default=MAX_LOADER_BATCH,
        help="batch size of the attribute-time train/test loaders, both sides (the IF cache "
        "loader stays one batch so both compute the Hessian of the mean loss)",
    )
    parser.add_argument("--dattri-python", default=DEFAULT_DATTRI_PYTHON)
    parser.add_argument("--no-dattri", action="store_true", help="run ours only")
    parser.add_argument("--smoke", action="store_true", help="a tiny workload, one rep (seconds)")
    parser.add_argument(
        "--work-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dattri_cli_bench")
    )
    parser.add_argument(
        "--out", default=None, help="output prefix for .json/.md/.png (default: <work-dir>/results)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    workloads = ["smoke"] if args.smoke else [w.strip() for w in args.workloads.split(",") if w.strip()]
    attributors = [a.strip() for a in args.attributors.split(",") if a.strip()]
    if args.smoke and args.attributors == parser.get_default("attributors"):
        attributors = ["if_cg", "grad_dot", "trak_proj"]
    reps = 1 if args.smoke else args.reps
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    for name in attributors:
        if name not in ATTRIBUTORS:
            parser.error(f"unknown attributor {name!r}; choose among {', '.join(ATTRIBUTORS)}")
    work = Path(args.work_dir)
    out = Path(args.out) if args.out else work / "results"
    out.parent.mkdir(parents=True, exist_ok=True)

    dattri_python = None if args.no_dattri else find_dattri_python(args.dattri_python)
    if dattri_python is None:
        why = "--no-dattri" if args.no_dattri else f"no dattri at {args.dattri_python}"
        print(f"running ours only ({why})", flush=True)

    rows: List[Dict[str, Any]] = []
    for workload in workloads:
        manifest = prepare(work, workload)
        print(
            f"workload {workload}: {manifest['num_params']} parameters, {WORKLOADS[workload]['n_train']} train / "
            f"{WORKLOADS[workload]['n_test']} test, {len(manifest['checkpoints'])} checkpoints",
            flush=True,
        )
        for name in attributors:
            conf = ATTRIBUTORS[name]
            if conf.get("lr_only") and WORKLOADS[workload]["model"] != "lr":
                continue
            row: Dict[str, Any] = {
                "workload": workload,
                "attributor": name,
                "runs": {"ours": [], "dattri": []},
            }
            skip = None
            if name == "if_datainf" and workload == "synthetic_big":
                skip = "skipped: its transform holds test_batch x test_batch x P floats (~400 GB here)"
            row["dattri_skipped"] = skip
            sides = ["ours"] + (["dattri"] if dattri_python and not skip else [])
            for rep in range(reps):
                for side in sides:
                    stem = work / workload / f"{name}_{side}_{rep}"
                    job = {
                        "workload": workload,
                        "attributor": name,
                        "side": side,
                        "threads": args.threads,
                        "work": str(work),
                        "result_path": f"{stem}.json",
                        "loader_batch": args.loader_batch,
                        "scores_path": f"{stem}.pt" if rep == 0 else None,
                        "floor": conf.get("floor") if side == "ours" else None,
                    }
                    Path(job["result_path"]).unlink(missing_ok=True)
                    python = sys.executable if side == "ours" else dattri_python
                    result = run_job(python, job, args.timeout)
                    row["runs"][side].append(result)
                    shown = (
                        result.get("error") or f"{result['seconds']:.3f} s, {result['peak_rss_mib']:.0f} MiB"
                    )
                    print(f"  {name:14s} {side:6s} rep {rep}: {shown}", flush=True)
            ours_scores, dattri_scores = (
                work / workload / f"{name}_ours_0.pt",
                work / workload / f"{name}_dattri_0.pt",
            )
            if (
                "dattri" in sides
                and ours_scores.is_file()
                and dattri_scores.is_file()
                and "error" not in row["runs"]["ours"][0]
                and "error" not in row["runs"]["dattri"][0]
            ):
                row["agreement"] = agreement(torch.load(ours_scores), torch.load(dattri_scores))
            else:
                row["agreement"] = None
            rows.append(row)
    summarize(rows)
    meta = {
        "command": "python "
        + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "reps": reps,
        "loader_batch": args.loader_batch,
        "dattri": "0.3.0" if dattri_python else None,
        "dattri_python": dattri_python,
        "workloads": {w: WORKLOADS[w] for w in workloads},
        "attributor_settings": {a: ATTRIBUTORS[a] for a in attributors},
    }
    table = markdown_table(rows)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    chart = bar_chart(rows, out.with_suffix(".png")) if dattri_python else False
    print(table)
    print(
        f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}"
        + (f", {out.with_suffix('.png')}" if chart else "")
    )
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
