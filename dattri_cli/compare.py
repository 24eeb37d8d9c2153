"""``dattri compare A B``: do two score files agree? For CI reproducibility jobs.

Prints correlation (overall Pearson and Spearman, mean per-test-column Spearman),
top-k overlap, the largest absolute and relative differences, and which metadata
keys differ. Thresholds make the exit status 1 when they are not met:

* ``--exact``: the score tensors are bitwise equal;
* ``--atol`` / ``--rtol`` / ``--scale-atol``: ``|a - b| <= atol + scale_atol * max|b| + rtol * |b|``
  everywhere (``--scale-atol`` is free of the score scale, which varies by method);
* ``--min-spearman X``: overall Spearman >= X.

Files over different samples (train or test indices) are refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from dattri_cli import metric
from dattri_cli.errors import ConfigError, DattriError
from dattri_cli.io import load_scores


def flatten(meta: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested metadata as ``{"a.b.c": value}``."""
    flat: Dict[str, Any] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def metadata_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    """Dotted keys whose values differ (or exist on one side only), sorted."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, _MISSING) != fb.get(k, _MISSING))


_MISSING = object()


def top_k_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """Mean over test columns of |top-k rows of a ∩ top-k rows of b| / k."""
    k = max(1, min(k, a.shape[0]))
    top_a = torch.topk(a, k, dim=0).indices.T.tolist()
    top_b = torch.topk(b, k, dim=0).indices.T.tolist()
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def _overall(a: np.ndarray, b: np.ndarray, spearman: bool) -> float:
    fn = metric.column_spearman if spearman else metric.column_pearson
    value = fn(a.reshape(-1, 1), b.reshape(-1, 1))[0]
    return float(value) if not np.isnan(value) else (1.0 if np.array_equal(a, b) else float("nan"))


def nan_report(t: Tensor, limit: int = 5) -> Dict[str, Any]:
    """How many scores are NaN and where the first ``limit`` are (``[row, column]``)."""
    mask = torch.isnan(t)
    where = mask.nonzero()[:limit].tolist() if bool(mask.any()) else []
    return {"count": int(mask.sum()), "first": where}


def _describe_nans(report: Mapping[str, Any]) -> str:
    if not report["count"]:
        return "none"
    first = ", ".join(f"row {r} column {c}" for r, c in report["first"])
    return f"{report['count']} (first at {first})"


def compare_scores(a: Tensor, b: Tensor, top_k: int = 10) -> Dict[str, Any]:
    """Agreement statistics of two equally shaped score tensors, NaN-aware.

    A NaN in the same place in both files counts as equal; the statistics are taken
    over the entries that are numbers in both, and ``nan_a`` / ``nan_b`` say where the NaNs are.
    """
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    same_nans = bool(torch.equal(nan_a, nan_b))
    either = nan_a | nan_b
    identical = same_nans and bool(torch.equal(a.masked_fill(either, 0), b.masked_fill(either, 0)))
    x, y = (
        a.masked_fill(either, 0).to(torch.float64).numpy(),
        b.masked_fill(either, 0).to(torch.float64).numpy(),
    )
    diff = np.abs(x - y)
    denom = np.maximum(np.abs(x), np.abs(y))
    rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1.0), 0.0)
    columns = metric.column_spearman(x, y)
    same_columns = np.array([np.array_equal(x[:, j], y[:, j]) for j in range(x.shape[1])])
    columns = np.where(np.isnan(columns) & same_columns, 1.0, columns)
    return {
        "identical": identical,
        "same_nan_positions": same_nans,
        "nan_a": nan_report(a),
        "nan_b": nan_report(b),
        "pearson": _overall(x, y, spearman=False),
        "spearman": _overall(x, y, spearman=True),
        "mean_column_spearman": float(np.nanmean(columns)) if not np.isnan(columns).all() else float("nan"),
        "top_k": int(min(top_k, x.shape[0])),
        "top_k_overlap": top_k_overlap(
            a.masked_fill(either, float("-inf")), b.masked_fill(either, float("-inf")), top_k
        ),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_diff": float(rel.max()) if rel.size else 0.0,
    }


def check_thresholds(stats: Mapping[str, Any], a: Tensor, b: Tensor, opts: argparse.Namespace) -> List[str]:
    """The failed checks, each as one sentence (empty when all pass)."""
    failures = []
    if not stats["same_nan_positions"]:
        failures.append(
            f"NaN scores at different positions: A has {_describe_nans(stats['nan_a'])}, B has {_describe_nans(stats['nan_b'])}"
        )
    if opts.exact and not stats["identical"] and stats["same_nan_positions"]:
        failures.append(f"--exact: scores differ (max abs diff {stats['max_abs_diff']:.3g})")
    if opts.atol is not None or opts.rtol is not None or opts.scale_atol is not None:
        finite = b[~torch.isnan(b)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        atol, rtol = (opts.atol or 0.0) + (opts.scale_atol or 0.0) * scale, opts.rtol or 0.0
        if not torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol, equal_nan=True):
            failures.append(
                f"tolerance atol={atol:.3g} rtol={rtol}: max abs diff {stats['max_abs_diff']:.3g}, max rel diff {stats['max_rel_diff']:.3g}"
            )
    if opts.min_spearman is not None and not stats["spearman"] >= opts.min_spearman:
        failures.append(f"--min-spearman {opts.min_spearman}: Spearman is {stats['spearman']:.6f}")
    return failures


def compare_files(path_a: Path, path_b: Path, top_k: int = 10) -> tuple[Dict[str, Any], Tensor, Tensor]:
    """Load two score files, refuse different samples, and compare them."""
    (ta, ma), (tb, mb) = load_scores(path_a), load_scores(path_b)
    for key in ("train_indices", "test_indices"):
        if not torch.equal(ta[key], tb[key]):
            msg = f"{path_a} and {path_b} score different samples ({key.replace('_', ' ')} differ); compare runs of the same dataset split"
            raise DattriError(msg)
    stats = compare_scores(ta["scores"], tb["scores"], top_k)
    stats["metadata_differs"] = metadata_differences(ma, mb)
    stats["a"], stats["b"] = str(path_a), str(path_b)
    return stats, ta["scores"], tb["scores"]


def parser() -> argparse.ArgumentParser:
    """Arguments of ``dattri compare``."""
    p = argparse.ArgumentParser(
        prog="dattri compare",
        description="Agreement of two score files; exit 1 when a threshold is not met.",
        epilog=(
            "examples:\n"
            "  dattri compare a.safetensors b.safetensors                 # statistics only\n"
            "  dattri compare a.safetensors b.safetensors --exact         # CI: same config, same bytes\n"
            "  dattri compare a.safetensors b.safetensors --scale-atol 1e-4 --min-spearman 0.999\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--exact", action="store_true", help="require bitwise-equal scores")
    p.add_argument("--atol", type=float, default=None, help="require |a-b| <= atol + rtol*|b|")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (with or without --atol)")
    p.add_argument(
        "--scale-atol",
        type=float,
        default=None,
        help="add this fraction of max|b| to atol (scale-free tolerance)",
    )
    p.add_argument("--min-spearman", type=float, default=None, help="require overall Spearman >= this")
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k overlap (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def print_table(stats: Mapping[str, Any], failures: List[str]) -> None:
    """A rich table of the statistics and the verdict."""
    from dattri_cli.console import make_console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"{Path(stats['a']).name} vs {Path(stats['b']).name}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key in (
        "identical",
        "pearson",
        "spearman",
        "mean_column_spearman",
        "top_k_overlap",
        "max_abs_diff",
        "max_rel_diff",
    ):
        value = stats[key]
        label = f"top-{stats['top_k']} overlap" if key == "top_k_overlap" else key.replace("_", " ")
        table.add_row(label, str(value) if isinstance(value, bool) else f"{value:.6g}")
    if stats["nan_a"]["count"] or stats["nan_b"]["count"]:
        table.add_row(
            "NaN scores (A / B)", f"{_describe_nans(stats['nan_a'])} / {_describe_nans(stats['nan_b'])}"
        )
    table.add_row("metadata keys differing", ", ".join(stats["metadata_differs"]) or "none")
    console = make_console()
    console.print(table)
    console.print("[red]FAIL[/red]: " + "; ".join(failures) if failures else "[green]OK[/green]")


def main(args: List[str]) -> int:
    """Compare, report, and return 0 (all thresholds met) or 1."""
    try:
        opts = parser().parse_args(args)
    except SystemExit as exc:  # argparse already printed the usage
        if exc.code:
            raise ConfigError("bad arguments for dattri compare; see dattri compare --help") from exc
        return 0
    if opts.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    stats, a, b = compare_files(opts.a, opts.b, opts.top_k)
    failures = check_thresholds(stats, a, b, opts)
    stats["failures"] = failures
    if opts.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print_table(stats, failures)
    return 1 if failures else 0


__all__: Optional[List[str]] = ["compare_files", "compare_scores", "main"]
