"""Million-parameter models side by side: ours, dattri 0.3.0, traker 0.3.2 and Kronfluence 1.0.1 (issue 17).

Every side gets the same model, checkpoints and data, written once to a work folder by
``scripts/peers/bench_models.py``: a ResNet-18 (torchvision's layout, 11.2M parameters, BN
in eval mode) on synthetic 3x32x32 images and a 4-layer 256-wide BERT-style classifier on
128-token sequences. Each measured call (the floor, one method of one side) runs in a
fresh interpreter (``--worker`` for ours, ``scripts/peers/run_*.py`` in each peer's own
virtual environment), with a time limit, its own peak resident memory (``wait4``) and,
optionally, a memory limit (``RLIMIT_DATA``) so that an out-of-memory peer fails alone.

* **floor**: one plain batched forward + ``loss.backward()`` over train + test;
* **ours**: Grad-Dot, TracIn (2 checkpoints), TRAK (dense and Kronecker projection), EK-FAC
  (cache + attribute), through the public API (``dattri_cli.algorithm``,
  ``dattri_cli.task.AttributionTask``) with the settings in :data:`OURS` below;
* **peers**: dattri 0.3.0 (the same API, settings in :data:`DATTRI`), traker's TRAK with its
  CPU ``BasicProjector`` (:data:`TRAKER`), Kronfluence's EK-FAC (:data:`KRONFLUENCE`).

The table (method, side, time, ratio to the floor, peak RSS, agreement with ours) is
printed and, with ``--markdown PATH``, appended to a file; ``--json PATH`` keeps every
field. A peer that fails (out of memory, time limit, error) is a row "failed: reason";
a setting a library does not accept is a row "unsupported: reason".

    python scripts/bench_big.py                                    # the issue's sizes (long)
    python scripts/bench_big.py --n-train 256 --n-test 32 --models resnet18
    python scripts/bench_big.py --smoke --peers none               # seconds; used by the tests
    bash scripts/peers/setup_peers.sh                              # the peers' virtual environments
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "scripts" / "peers"
sys.path.insert(0, str(PEERS_DIR))

METHODS = ("floor", "grad_dot", "tracin", "trak_dense", "trak_kronecker", "ekfac", "ekfac_exact")
PROJ_DIM = 512  # TRAK's projection dimension on every side (--proj-dim)

# ------------------------------------------------------------------------------------------------
# Settings per method and side. ``api`` picks the attributor class of the dattri API
# (``tracin``: TracInAttributor, ``trak``: TRAKAttributor, ``ekfac``: IFAttributorEKFAC) or
# ``floor``; ``kwargs`` go to its constructor as they are (a keyword the class does not take
# makes the row "unsupported", e.g. ``"grad_backend": "layers"`` before that option exists);
# ``projector_kwargs`` too. "{proj_dim}" is replaced by --proj-dim.

OURS: Dict[str, Dict[str, Any]] = {
    "floor": {"api": "floor"},
    "grad_dot": {"api": "tracin", "checkpoints": "last", "kwargs": {"normalized_grad": False}},
    "tracin": {"api": "tracin", "checkpoints": "all", "kwargs": {"normalized_grad": False}},
    "trak_dense": {
        "api": "trak",
        "checkpoints": "last",
        "kwargs": {},
        "projector_kwargs": {"proj_type": "normal", "proj_dim": "{proj_dim}", "proj_seed": 0},
    },
    "trak_kronecker": {
        "api": "trak",
        "checkpoints": "last",
        "kwargs": {},
        # proj_dim is per layer for the Kronecker projection: 64 per layer is ~2.6k features on
        # ResNet-18 (41 layers with parameters); --proj-dim per layer would make TRAK's kernel
        # (41 * 512)^2 values, 2.5 GB in float32 for its eigendecomposition alone
        "projector_kwargs": {"proj_type": "kronecker", "proj_dim": 64, "proj_seed": 0},
    },
    # automatic damping (0.1 x each layer's mean eigenvalue), Gauss-Newton Fisher with one sampled
    # pseudo-gradient per sample: the work Kronfluence does (it samples one label per sample)
    "ekfac": {
        "api": "ekfac",
        "checkpoints": "last",
        "kwargs": {"damping": None, "fisher": "gauss_newton", "num_output_samples": 1},
    },
    # the exact Gauss-Newton factors: one backward pass per class (10 on these models); ours only
    "ekfac_exact": {
        "api": "ekfac",
        "checkpoints": "last",
        "kwargs": {"damping": None, "fisher": "gauss_newton"},
    },
}

# dattri 0.3.0 always projects TracIn's gradients unless told "identity"; its EK-FAC has no
# automatic damping (fixed 0.01 here) and uses the empirical Fisher of nn.Linear layers only.
DATTRI: Dict[str, Dict[str, Any]] = {
    "grad_dot": {**OURS["grad_dot"], "projector_kwargs": {"proj_type": "identity"}},
    "tracin": {**OURS["tracin"], "projector_kwargs": {"proj_type": "identity"}},
    "trak_dense": OURS["trak_dense"],
    "ekfac": {"api": "ekfac", "checkpoints": "last", "kwargs": {"damping": 0.01}},
}
TRAKER: Dict[str, Dict[str, Any]] = {
    "trak_dense": {"api": "trak", "proj_dim": "{proj_dim}", "proj_type": "normal", "seed": 0},
}
KRONFLUENCE: Dict[str, Dict[str, Any]] = {
    "ekfac": {"api": "ekfac", "strategy": "ekfac", "damping_factor": None},
}

DEFAULT_PEERS_ROOT = Path(os.environ.get("DATTRI_PEERS_DIR", "/work/peers"))
PEERS: Dict[str, Dict[str, Any]] = {
    "dattri": {
        "runner": "run_dattri.py",
        "table": DATTRI,
        "python": os.environ.get("DATTRI_PYTHON", "/tmp/dattri-venv/bin/python"),
        "probe": "import dattri",
    },
    "traker": {
        "runner": "run_traker.py",
        "table": TRAKER,
        "python": str(DEFAULT_PEERS_ROOT / "traker-venv" / "bin" / "python"),
        "probe": "import trak",
    },
    "kronfluence": {
        "runner": "run_kronfluence.py",
        "table": KRONFLUENCE,
        "python": str(DEFAULT_PEERS_ROOT / "kronfluence-venv" / "bin" / "python"),
        "probe": "import kronfluence",
    },
}

OOM_MARKERS = ("out of memory", "can't allocate memory", "MemoryError", "Cannot allocate memory")


# ------------------------------------------------------------------------------------------------
# the worker (ours)


def worker(job_json: str) -> int:
    """One measured call of ours: the same frame and API code as the dattri peer."""
    sys.argv = [sys.argv[0], "--job", job_json]
    import dattri_api  # noqa: PLC0415
    import harness  # noqa: PLC0415

    return harness.run_job(lambda job, ctx: dattri_api.build(job, ctx, "dattri_cli"))


# ------------------------------------------------------------------------------------------------
# measuring one call


def _fill(settings: Dict[str, Any], proj_dim: int) -> Dict[str, Any]:
    """``settings`` with every "{proj_dim}" replaced by the number."""
    if isinstance(settings, dict):
        return {k: _fill(v, proj_dim) for k, v in settings.items()}
    return proj_dim if settings == "{proj_dim}" else settings


def _limit_memory(limit_bytes: Optional[int]):  # noqa: ANN202 - a preexec_fn
    def apply() -> None:
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    return apply


def vm_hwm_gib(pid: int) -> Optional[float]:
    """The process's peak resident memory since its exec (``VmHWM``), or None once it is gone.

    Not ``ru_maxrss``: the kernel folds the parent's peak RSS at fork/exec time into the
    child's ``maxrss``, so every call would show at least this orchestrator's size.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure(
    cmd: List[str], env: Dict[str, str], timeout: float, mem_limit_gib: Optional[float], log: Path
) -> Dict:
    """Run ``cmd``; its result JSON (last stdout line), wall time and its own peak RSS.

    The peak is what the call reports of itself at the end (``peak_rss_gib`` from
    ``harness.run_job``), else the last ``VmHWM`` read while polling it every 50 ms (a call
    that failed or was killed). Never raises: a time-out, a kill (out of memory) or a
    failure becomes ``status`` "failed" with a one-line ``reason``; exit status 3 is
    "unsupported".
    """
    limit = int(mem_limit_gib * 2**30) if mem_limit_gib else None
    start = time.perf_counter()
    hwm = 0.0
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen(  # noqa: PLW1509 - the memory limit must be set in the child
            cmd, env=env, stdout=out, stderr=err, start_new_session=True, preexec_fn=_limit_memory(limit)
        )
        timed_out = False
        while True:
            seen = vm_hwm_gib(proc.pid)
            if seen is not None:
                hwm = max(hwm, seen)
            if proc.poll() is not None:
                break
            if time.perf_counter() - start > timeout and not timed_out:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the call and whatever it started
            time.sleep(0.05)
    wall = time.perf_counter() - start
    row: Dict[str, Any] = {"wall_seconds": wall, "peak_rss_gib": hwm, "returncode": proc.returncode}
    stdout = log.with_suffix(".out").read_text().strip().splitlines()
    stderr = log.read_text()
    result: Dict[str, Any] = {}
    for line in reversed(stdout):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    if timed_out:
        return {**row, "status": "failed", "reason": f"over the {timeout:.0f} s limit"}
    if proc.returncode == 3 and "unsupported" in result:
        return {**row, "status": "unsupported", "reason": result["unsupported"]}
    if proc.returncode != 0 or "seconds" not in result:
        if any(m.lower() in stderr.lower() for m in OOM_MARKERS) or proc.returncode == -signal.SIGKILL:
            where = f" (limit {mem_limit_gib:g} GiB)" if mem_limit_gib else ""
            reason = f"out of memory{where}"
        else:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
            reason = f"exit {proc.returncode}: " + ((errors or lines or ["no output"])[-1].strip()[:300])
        return {**row, "status": "failed", "reason": reason}
    return {**row, **result, "status": "ok"}


def peer_available(python: str, probe: str) -> Optional[str]:
    """None if ``python`` imports the peer; else why not."""
    if not Path(python).exists():
        return f"no virtual environment at {python} (run scripts/peers/setup_peers.sh)"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot '{probe}': {tail[:200]}"
    return None


def agreement(ours: Path, theirs: Path) -> Optional[Dict[str, float]]:
    """Pearson and Spearman over all entries (the numbers of ``dattri compare``)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from dattri_cli.compare import compare_scores  # noqa: PLC0415

    if not (ours.is_file() and theirs.is_file()):
        return None
    a, b = load_file(str(ours))["scores"], load_file(str(theirs))["scores"]
    if a.shape != b.shape:
        return None
    stats = compare_scores(a, b)
    return {"pearson": stats["pearson"], "spearman": stats["spearman"]}


# ------------------------------------------------------------------------------------------------
# the table


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| model | method | side | time (s) | x floor | peak RSS (GiB) | agreement with ours (Pearson / Spearman) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["status"] == "ok":
            time_s = _fmt(r["seconds"], ".2f")
            ratio = _fmt(r.get("ratio_to_floor"), ".2f")
        else:
            time_s, ratio = f"{r['status']}: {r['reason']}".replace("|", "/"), "-"
        ag = r.get("agreement")
        agree = f"{ag['pearson']:.3f} / {ag['spearman']:.3f}" if ag else "-"
        if ag and r.get("agreement_with"):
            agree += f" (vs {r['agreement_with']})"
        rss = _fmt(r.get("peak_rss_gib"), ".2f")
        if r.get("gpu_peak_gib") is not None:
            rss += f" (GPU {r['gpu_peak_gib']:.2f})"
        lines.append(f"| {r['model']} | {r['method']} | {r['side']} | {time_s} | {ratio} | {rss} | {agree} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default="resnet18,bert", help="comma-separated among resnet18, bert")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--peers", default="dattri,traker,kronfluence", help="comma-separated, or 'none'")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="loader batch size, every side")
    p.add_argument("--proj-dim", type=int, default=PROJ_DIM)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measured call")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=None,
        help="RLIMIT_DATA of each call (an allocation beyond it fails: 'out of memory'); default none",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models and data (seconds); for the tests")
    p.add_argument("--work-dir", default=None, help="keep inputs, scores and logs here (default: a temp dir)")
    p.add_argument("--markdown", default=None, help="append the table (with a header line) to this file")
    p.add_argument("--json", default=None, help="write every row and the settings to this file")
    for name, peer in PEERS.items():
        p.add_argument(f"--{name}-python", default=peer["python"], help=f"the python of {name}'s venv")
    args = p.parse_args(argv)
    if args.smoke:
        defaults = {"n_train": 1000, "n_test": 100, "proj_dim": PROJ_DIM, "batch": 32}
        smoke = {"n_train": 24, "n_test": 6, "proj_dim": 16, "batch": 8}
        for key, value in smoke.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    import bench_models as bm  # noqa: PLC0415

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    peers = (
        [] if args.peers.strip() in ("", "none") else [p.strip() for p in args.peers.split(",") if p.strip()]
    )
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose among {', '.join(METHODS)}")
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; choose among {', '.join(PEERS)}")
    if "floor" not in methods:
        methods.insert(0, "floor")  # every ratio needs it
    pythons = {p: getattr(args, f"{p}_python") for p in peers}
    missing = {p: peer_available(pythons[p], PEERS[p]["probe"]) for p in peers}

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_big_")
        work = Path(tmp.name)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    env.update({"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    ours_env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}

    rows: List[Dict[str, Any]] = []
    header = {}
    for model_name in models:
        folder = work / model_name
        spec = bm.default_spec(model_name, smoke=args.smoke)
        bm.write_inputs(folder, spec, args.n_train, args.n_test, train_steps=1 if args.smoke else 3)
        n_params = bm.num_params(bm.build_model(spec))
        header[model_name] = n_params
        print(f"{model_name}: {n_params:,} parameters, {args.n_train} train / {args.n_test} test", flush=True)
        floor_seconds = None
        for method in methods:
            sides = [("ours", sys.executable, None, OURS)]
            sides += [
                (p, pythons[p], PEERS[p]["runner"], PEERS[p]["table"])
                for p in peers
                if method in PEERS[p]["table"]
            ]
            for side, python, runner, table in sides:
                row: Dict[str, Any] = {"model": model_name, "method": method, "side": side}
                stem = folder / f"{method}_{side}"
                settings = _fill(table[method], args.proj_dim)
                job = {
                    "work": str(folder),
                    "method": method,
                    "settings": settings,
                    "batch": args.batch,
                    "threads": args.threads,
                    "device": args.device,
                    "out": f"{stem}.safetensors" if method != "floor" else None,
                }
                row["settings"] = settings
                if side != "ours" and missing.get(side):
                    row.update({"status": "failed", "reason": missing[side]})
                else:
                    if side == "ours":
                        cmd, call_env = (
                            [python, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                            ours_env,
                        )
                    else:
                        cmd, call_env = [python, str(PEERS_DIR / runner), "--job", json.dumps(job)], peer_env
                    row.update(
                        measure(cmd, call_env, args.timeout, args.mem_limit_gib, stem.with_suffix(".log"))
                    )
                if method == "floor" and row["status"] == "ok":
                    floor_seconds = row["seconds"]
                if row["status"] == "ok" and floor_seconds:
                    row["ratio_to_floor"] = row["seconds"] / floor_seconds
                if row["status"] == "ok" and side != "ours":
                    row["agreement"] = agreement(
                        folder / f"{method}_ours.safetensors", Path(f"{stem}.safetensors")
                    )
                if row["status"] == "ok" and side == "ours" and method == "trak_kronecker":
                    row["agreement"] = agreement(
                        folder / "trak_dense_ours.safetensors", Path(f"{stem}.safetensors")
                    )
                    row["agreement_with"] = "ours dense"
                shown = (
                    f"{row['seconds']:.2f} s"
                    if row["status"] == "ok"
                    else f"{row['status']}: {row['reason']}"
                )
                print(
                    f"  {method:15s} {side:12s} {shown}, peak RSS {row.get('peak_rss_gib', 0):.2f} GiB",
                    flush=True,
                )
                rows.append(row)

    import torch  # noqa: PLC0415

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (
        f"bench_big {date}: {', '.join(f'{m} ({n:,} params)' for m, n in header.items())}, "
        f"{args.n_train} train / {args.n_test} test, batch {args.batch}, proj_dim {args.proj_dim}, "
        f"{args.threads} threads, device {args.device}, torch {torch.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, timeout {args.timeout:.0f} s"
        + (f", memory limit {args.mem_limit_gib:g} GiB" if args.mem_limit_gib else "")
    )
    table = markdown(rows)
    print(title)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"\n{title}\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "args": vars(args), "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
