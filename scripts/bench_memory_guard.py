"""Check the memory guard's estimates against measured peaks: `dattri run` per case, one fresh process each.

For every (model, attributor) case the real CLI runs in its own process; the guard's
estimate (total and per component) comes back in the run's sidecar (``timings``:
``memory_estimate_mib``, ``memory_estimate_<part>_mib``, and ``rss_before_guard_mib``,
the resident memory of the process before the guard: interpreter, torch, data, model).
The measured peak is the child's ``ru_maxrss`` (``os.wait4``). The guard estimates
what the attribution adds on top of that base, so the ratio compared is

    estimate / (measured peak - base)

A ratio above 3 means the guard would refuse runs that fit; below 1, it lets through
runs that do not. Where both sides are below ``--floor`` MiB the case is dominated by
allocator noise and marked ``small`` (it cannot matter for a refusal either way).

    python scripts/bench_memory_guard.py                   # the whole grid (about 10 min on 2 cores)
    python scripts/bench_memory_guard.py --only if_ekfac   # the cases whose label contains a word
    python scripts/bench_memory_guard.py --markdown        # the table as markdown (docs/benchmarks.md)

Checkpoints are trained once per model into a temporary ``cache_dir`` (the first case
of a model trains; training happens after the guard and is far smaller than these peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: digits (1000 train / 200 test) models: the ones the CLI ships, sized so the attribution dominates
DIGITS_MODELS = {
    "lr": ["model=lr", "train.epochs=3"],
    "mlp": ["model=mlp", "train.epochs=3"],  # 64-128-128-10: 26k parameters
    "cnn": ["model=cnn", "model.channels=16", "train.epochs=3"],
}
#: if_explicit forms P^2: the MLP is narrowed so the Hessian is hundreds of MiB, not GiB
EXPLICIT_MLP = ["model=mlp", "model.hidden=[48]", "train.epochs=3"]
#: options every case of a method gets: TRAK's width; CG's damping (the MLP and CNN are not convex)
METHOD_OPTIONS = {
    "trak": ["attributor.projector_kwargs.proj_dim=256"],
    # the memory is one iteration's; 50 test rows make one chunk of 50 right-hand sides
    "if_cg": ["attributor.regularization=10.0", "attributor.max_iter=3", "dataset.n_test=50"],
}
DIGITS_METHODS = ["grad_dot", "trak", "if_cg", "if_explicit", "if_datainf", "if_ekfac"]
#: the examples (examples/experiment/*.yaml), scaled up a little so the attribution is visible over the base
EXAMPLES = {
    "images": ["+experiment=images", "dataset.n_train=28", "loader.train_batch_size=28", "model.channels=32"],
    "bert_text": [
        "+experiment=bert_text",
        "model.config.hidden_size=128",
        "model.config.intermediate_size=256",
        "loader.train_batch_size=40",
    ],
    "gpt2_lm": ["+experiment=gpt2_lm", "model.config.n_embd=64", "loader.train_batch_size=40"],
    "regression_mlp": ["+experiment=regression_mlp", "model.hidden=[256,256]", "loader.train_batch_size=60"],
}
EXAMPLE_METHODS = ["grad_dot", "trak", "if_ekfac"]
#: extra EK-FAC cases: the Gauss-Newton output Hessian with many outputs per sample
EXTRA = [
    (
        "gpt2_lm/if_ekfac vocab 256 k=2",
        [
            "+experiment=gpt2_lm",
            "model.config.vocab_size=256",
            "loader.train_batch_size=40",
            "attributor=if_ekfac",
            "attributor.num_output_samples=2",
        ],
    ),
    (  # exact: one backward pass per output (6 x 32 per sample), the C x C output Hessians
        "gpt2_lm/if_ekfac exact 6 tokens",
        ["+experiment=gpt2_lm", "dataset.max_length=6", "loader.train_batch_size=40", "attributor=if_ekfac"],
    ),
]


@dataclass
class Row:
    label: str
    estimate: Optional[float]  # MiB
    base: Optional[float]  # MiB
    peak: float  # MiB
    seconds: float
    largest: str
    error: str = ""

    @property
    def added(self) -> Optional[float]:
        return None if self.base is None else max(self.peak - self.base, 0.0)

    def ratio(self) -> Optional[float]:
        if self.estimate is None or not self.added:
            return None
        return self.estimate / self.added


def cases() -> List[Tuple[str, List[str]]]:
    out: List[Tuple[str, List[str]]] = []
    for model, over in DIGITS_MODELS.items():
        for method in DIGITS_METHODS:
            if method == "if_explicit" and model == "cnn":
                continue  # P^2 of the CNN is tens of GiB: the guard refuses it (tests/test_memory.py)
            base = EXPLICIT_MLP if (method, model) == ("if_explicit", "mlp") else over
            out.append(
                (f"digits {model}/{method}", [*base, f"attributor={method}", *METHOD_OPTIONS.get(method, [])])
            )
    for name, over in EXAMPLES.items():
        for method in EXAMPLE_METHODS:
            extra = ["attributor.projector_kwargs.proj_dim=64"] if method == "trak" else []
            if (name, method) == ("gpt2_lm", "if_ekfac"):  # sampled: the exact factors are an EXTRA case
                extra = ["attributor.num_output_samples=4"]
            out.append((f"{name}/{method}", [*over, f"attributor={method}", *extra]))
    out.extend(EXTRA)
    return out


def run_case(label: str, overrides: List[str], work: Path, cache: Path, timeout: float) -> Row:
    cmd = [sys.executable, "-m", "dattri_cli"]  # this interpreter's package, not a `dattri` elsewhere on PATH
    out = work / (label.replace(" ", "_").replace("/", "__").replace("=", "") + ".safetensors")
    cmd += [
        "run",
        *overrides,
        "progress=off",
        "feature_cache=false",  # every case computes what it estimates (a cache hit would skip the work)
        f"cache_dir={cache}",
        f"out={out}",
        f"hydra.run.dir={work / 'hydra'}",
    ]
    if any(o.startswith("+experiment") for o in overrides):
        at = cmd.index("run") + 1
        cmd[at:at] = ["--config-dir", str(ROOT / "examples")]
    start = time.perf_counter()
    err_path = out.with_suffix(".stderr")
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        returncode, peak = _wait4(proc, timeout)
    seconds = time.perf_counter() - start
    stderr = err_path.read_text(errors="replace")
    sidecar = out.parent / f"{out.stem}.run.json"
    if returncode != 0 or not sidecar.exists():
        lines = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
        return Row(label, None, None, peak, seconds, "", (lines[-1] if lines else f"rc {returncode}")[:160])
    timings: Dict[str, float] = json.loads(sidecar.read_text())["timings"]
    parts = {
        k[len("memory_estimate_") : -len("_mib")]: v
        for k, v in timings.items()
        if k.startswith("memory_estimate_") and k != "memory_estimate_mib"
    }
    largest = max(parts, key=lambda k: parts[k]) if parts else ""
    peak = max(peak, float(timings.get("peak_rss_mib", 0.0)))
    return Row(
        label, timings.get("memory_estimate_mib"), timings.get("rss_before_guard_mib"), peak, seconds, largest
    )


def _wait4(proc: subprocess.Popen, timeout: float) -> Tuple[int, float]:
    """The child's exit code and its own peak resident memory (MiB) from ``wait4``; killed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _fmt(value: Optional[float], spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def verdict(row: Row, floor: float) -> str:
    if row.error:
        return "failed: " + row.error
    ratio = row.ratio()
    if row.estimate is None or ratio is None:
        return "?"
    if row.estimate < floor and (row.added or 0) < floor:
        return "small"
    if ratio > 3:
        return "over (>3x)"
    if ratio < 1:
        return "UNDER"
    return "ok"


def table(rows: List[Row], floor: float, markdown: bool) -> str:
    head = [
        "case",
        "estimate MiB",
        "largest term",
        "base MiB",
        "peak MiB",
        "added MiB",
        "ratio",
        "s",
        "verdict",
    ]
    body = [
        [
            r.label,
            _fmt(r.estimate),
            r.largest,
            _fmt(r.base),
            _fmt(r.peak),
            _fmt(r.added),
            _fmt(r.ratio(), ".2f"),
            f"{r.seconds:.0f}",
            verdict(r, floor),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2, 8) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def make_example_data() -> None:
    if not (ROOT / "examples" / "data" / "lm" / "corpus.txt").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_data.py")], cwd=ROOT, check=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="", help="comma-separated: run the cases whose label contains one of these"
    )
    parser.add_argument("--floor", type=float, default=32.0, help="MiB below which a case is 'small'")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep score files and the checkpoint cache here"
    )
    args = parser.parse_args(argv)
    make_example_data()
    words = [w for w in args.only.split(",") if w]
    chosen = [(label, over) for label, over in cases() if not words or any(w in label for w in words)]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_memory_guard_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for label, over in chosen:
            row = run_case(label, over, work, work / "cache", args.timeout)
            rows.append(row)
            print(
                f"{label}: estimate {_fmt(row.estimate)} MiB, added {_fmt(row.added)} MiB "
                f"(peak {row.peak:.0f}), {row.seconds:.0f}s {verdict(row, args.floor)}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.floor, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
