"""Build a method through the dattri 0.3.0 public API, for ``dattri`` itself or ``dattri_cli``.

dattri-cli is a drop-in for dattri 0.3.0's API, so ours (``scripts/bench_big.py --worker``)
and dattri (``run_dattri.py``) go through this very code; only the package and the
settings (the tables at the top of ``bench_big.py``) differ. A setting the library does
not accept when the attributor is constructed (an unknown keyword, an unknown
``proj_type``) raises :class:`harness.Unsupported`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

import bench_models as bm
import torch
from harness import Unsupported


def build(job: Dict[str, Any], ctx: Dict[str, Any], package: str) -> Callable[[], torch.Tensor]:
    s = job["settings"]
    api, model, ld, device = s["api"], ctx["model"], ctx["loaders"], job.get("device", "cpu")
    if api == "floor":
        return lambda: bm.floor_pass(model, ctx["data"], job["batch"], device)
    task_mod = importlib.import_module(f"{package}.task")
    fns = bm.per_sample_functions(model)
    ckpts = ctx["ckpts"] if s.get("checkpoints") == "all" else ctx["ckpts"][-1:]
    ckpts = [{k: v.to(device) for k, v in c.items()} for c in ckpts]
    kwargs = dict(s.get("kwargs") or {})
    try:
        if api == "tracin":
            cls = importlib.import_module(f"{package}.algorithm.tracin").TracInAttributor
            task = task_mod.AttributionTask(
                loss_func=fns["ce"], model=model, checkpoints=ckpts, target_func=fns["ce"]
            )
            weights = torch.full(
                (len(ckpts),), float(ctx["spec"]["lr"] if s.get("checkpoints") == "all" else 1.0)
            )
            attributor = cls(
                task, weight_list=weights, projector_kwargs=s.get("projector_kwargs"), device=device, **kwargs
            )

            def run() -> torch.Tensor:
                attributor.cache()
                return attributor.attribute(ld["train"], ld["test"])

            return run
        if api == "trak":
            cls = importlib.import_module(f"{package}.algorithm.trak").TRAKAttributor
            task = task_mod.AttributionTask(
                loss_func=fns["margin"], model=model, checkpoints=ckpts, target_func=fns["margin"]
            )
            attributor = cls(
                task,
                correct_probability_func=fns["p_correct"],
                projector_kwargs=s.get("projector_kwargs"),
                device=device,
                **kwargs,
            )

            def run() -> torch.Tensor:
                attributor.cache(ld["train"])
                return attributor.attribute(ld["test"])

            return run
        if api == "ekfac":
            cls = importlib.import_module(f"{package}.algorithm.influence_function").IFAttributorEKFAC
            ce = bm.batch_ce(model)
            task = task_mod.AttributionTask(loss_func=ce, model=model, checkpoints=ckpts[-1], target_func=ce)
            attributor = cls(task, device=device, **kwargs)

            def run() -> torch.Tensor:
                attributor.cache(ld["train"])
                return attributor.attribute(ld["train"], ld["test"])

            return run
    except Exception as exc:  # noqa: BLE001 - construction (no work yet) refused a setting
        raise Unsupported(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
    msg = f"unknown api {api!r}"
    raise Unsupported(msg)
