"""The short summary printed at the end of ``dattri run``."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from dattri_cli.pipeline import RunResult


def print_summary(result: RunResult, top_k: int = 3) -> None:
    """Output path, shape, time per stage, and the strongest proponents/opponents of test 0."""
    console = Console(stderr=True)
    scores = result.scores
    console.print(f"[bold green]wrote[/] {result.path}  scores {tuple(scores.shape)} (train x test)")
    stages = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in result.timings.items() if k.endswith("_s"))
    console.print(f"time: {stages}; peak memory {result.timings.get('peak_rss_mib', 0):.0f} MiB")
    if scores.numel() == 0:
        return
    column = scores[:, 0]
    k = min(top_k, column.numel())
    table = Table(title="test sample 0: strongest training samples (row = position in train set)")
    table.add_column("proponents (help)")
    table.add_column("opponents (hurt)")
    pro = torch.topk(column, k).indices.tolist()
    con = torch.topk(-column, k).indices.tolist()
    for p, c in zip(pro, con):
        table.add_row(f"#{p}: {float(column[p]):+.4g}", f"#{c}: {float(column[c]):+.4g}")
    console.print(table)
