"""The shared frame of every measured call of ``scripts/bench_big.py`` (ours and the peers).

A runner is started in a fresh interpreter as ``python RUNNER --job '<json>'``. It reads the
job (input folder, method, settings, batch size, threads, device, where to write the
scores), builds the method with :func:`run_job`'s ``build`` callback (untimed), runs it
(timed, wall clock, device synchronised), writes the ``(n_train, n_test)`` float32 scores
as safetensors and prints one JSON line. Exit status 3 with ``{"unsupported": why}`` means
the method or one of its settings is not offered by that library (the row reads
"unsupported"); any other failure is an ordinary traceback and non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402


class Unsupported(Exception):
    """The library does not offer this method or setting."""


def loaders(data: Dict[str, torch.Tensor], batch: int) -> Dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset  # noqa: PLC0415

    train = TensorDataset(data["x_train"], data["y_train"])
    test = TensorDataset(data["x_test"], data["y_test"])
    return {
        "train": DataLoader(train, batch_size=batch, shuffle=False),
        "test": DataLoader(test, batch_size=batch, shuffle=False),
        "train_set": train,
        "test_set": test,
    }


def warm_up(model: torch.nn.Module, data: Dict[str, torch.Tensor], device: str, batch: int) -> None:
    """Outside the timed region, on every side alike: load torch.func's lazily imported modules
    and set up the model's kernels (oneDNN creates them per shape: seconds on the first call)
    with one forward/backward pass on the first train batch and the first test batch."""
    from torch.func import grad, vmap  # noqa: PLC0415

    w = torch.ones(3)
    vmap(grad(lambda w, x: (w * x).sum()), in_dims=(None, 0))(w, torch.ones(2, 3))
    bm.floor_pass(model, {k: v[:batch] for k, v in data.items()}, batch, device)
    model.zero_grad(set_to_none=True)


def peak_rss_gib() -> float:
    """This process's peak resident memory since its exec (``VmHWM``; not ``ru_maxrss``, which
    includes the parent's peak at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_job(build: Callable[[Dict[str, Any], Dict[str, Any]], Callable[[], torch.Tensor]]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    job = json.loads(parser.parse_args().job)
    torch.set_num_threads(int(job["threads"]))
    device = job.get("device", "cpu")
    spec, model, data, ckpts = bm.load_inputs(Path(job["work"]))
    model.to(device)
    ctx = {"spec": spec, "model": model, "data": data, "ckpts": ckpts, "loaders": loaders(data, job["batch"])}
    try:
        run = build(job, ctx)
    except Unsupported as exc:
        print(json.dumps({"unsupported": str(exc)}), flush=True)
        return 3
    warm_up(model, data, device, int(job["batch"]))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scores = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result: Dict[str, Any] = {"seconds": seconds}
    if cuda:
        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if scores is not None and job.get("out"):
        from safetensors.torch import save_file  # noqa: PLC0415

        scores = torch.as_tensor(scores).detach().to("cpu", torch.float32).contiguous()
        n_train, n_test = len(data["x_train"]), len(data["x_test"])
        if tuple(scores.shape) != (n_train, n_test):
            msg = f"scores have shape {tuple(scores.shape)}, expected ({n_train}, {n_test})"
            raise RuntimeError(msg)
        save_file({"scores": scores}, job["out"])
        result["finite"] = bool(torch.isfinite(scores).all())
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result), flush=True)
    return 0
