"""The short summary printed at the end of ``dattri run``."""

from __future__ import annotations

from typing import Tuple

import torch
from rich.table import Table

from dattri_cli.console import make_console
from dattri_cli.io import open_score_set
from dattri_cli.pipeline import RunResult


def _written(result: RunResult) -> Tuple[str, Tuple[int, int], torch.Tensor]:
    """What was written, the score shape and the scores of test column 0."""
    if result.scores is not None:
        column = result.scores[:, 0] if result.scores.numel() else result.scores.new_zeros(0)
        return str(result.path), tuple(result.scores.shape), column
    shape = open_score_set(result.files).shape  # file headers only
    column = result.first_test_scores if result.first_test_scores is not None else torch.zeros(0)
    where = (
        f"{len(result.files)} row-block files "
        f"{result.files[0].parent / result.files[0].name.replace('-00000-of-', '-*-of-')}"
    )
    return where, shape, column


def print_summary(result: RunResult, top_k: int = 3) -> None:
    """Output path, shape, time per stage, and the strongest proponents/opponents of test 0."""
    out, err = make_console(), make_console(stderr=True)  # results on stdout, timings on stderr
    where, shape, column = _written(result)
    out.print(f"[bold green]wrote[/] {where}  scores {shape} (train x test)")
    stages = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in result.timings.items() if k.endswith("_s"))
    err.print(f"time: {stages}; peak memory {result.timings.get('peak_rss_mib', 0):.0f} MiB")
    if column.numel() == 0:
        return
    k = min(top_k, column.numel())
    table = Table(title="test sample 0: strongest training samples (row = position in train set)")
    table.add_column("proponents (help)")
    table.add_column("opponents (hurt)")
    pro = torch.topk(column, k).indices.tolist()
    con = torch.topk(-column, k).indices.tolist()
    for p, c in zip(pro, con):
        table.add_row(f"#{p}: {float(column[p]):+.4g}", f"#{c}: {float(column[c]):+.4g}")
    out.print(table)
