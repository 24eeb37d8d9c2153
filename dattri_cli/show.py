"""``dattri show``: what a score file holds, and who helped or hurt chosen test samples."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from dattri_cli.errors import DattriError
from dattri_cli.io import (
    SCORES,
    TEST_INDICES,
    TRAIN_INDICES,
    ShardedScores,
    is_score_set,
    load_scores,
    open_score_set,
    score_set_source,
)

if TYPE_CHECKING:
    from dattri_cli.data.recorded import RecordedData

EXAMPLES = """examples:
  dattri show outputs/2026-11-30/12-00-00_grad_dot_digits_lr/scores.safetensors
  dattri show scores.safetensors --test 0,5,9 --top-k 5
  dattri show scores.safetensors --json > summary.json
"""


@dataclass
class ScoreFile:
    """A score file or a set of row-block shards, with its dataset when it can be rebuilt.

    Shard sets stay on disk: columns and statistics are read piece by piece. ``data``
    (labels, file names, texts, pictures per row) is ``None`` when the recorded
    dataset cannot be rebuilt here; ``labels_note`` then says why.
    """

    path: Path
    train_indices: Tensor
    test_indices: Tensor
    metadata: Dict[str, Any]
    data: Optional[RecordedData]
    full: Optional[Tensor] = None  # the whole matrix (single file)
    shards: Optional[ShardedScores] = None  # lazily read row blocks (shard set)
    labels_note: str = ""  # why ``data`` is None or partial, when labels were asked for

    @property
    def shape(self) -> Tuple[int, int]:
        """``(n_train, n_test)``."""
        return tuple(self.full.shape) if self.full is not None else self.shards.shape

    def column(self, col: int) -> Tensor:
        """All training scores of test column ``col``."""
        return self.full[:, col] if self.full is not None else self.shards.column(col)

    def row_blocks(self, rows: int = 4096) -> Iterator[Tensor]:
        """The matrix in row blocks (one block for a single file)."""
        if self.full is not None:
            yield self.full
            return
        for start in range(0, self.shape[0], rows):
            yield self.shards.rows(start, min(start + rows, self.shape[0]))


def open_score_file(path: Path, with_data: bool = True) -> ScoreFile:
    """Load ``path`` (a file, or shards: a folder, a glob or one shard's name); rebuild the dataset for labels."""
    path = Path(path)
    if is_score_set(path):
        shards = open_score_set(score_set_source(path))
        meta = shards.metadata
        train_indices = shards.train_indices
        data, note = _rebuild_data(meta, train_indices, shards.test_indices) if with_data else (None, "")
        return ScoreFile(
            path, train_indices, shards.test_indices, meta, data, shards=shards, labels_note=note
        )
    tensors, meta = load_scores(path)
    data, note = (
        _rebuild_data(meta, tensors[TRAIN_INDICES], tensors[TEST_INDICES]) if with_data else (None, "")
    )
    return ScoreFile(
        path,
        tensors[TRAIN_INDICES],
        tensors[TEST_INDICES],
        meta,
        data,
        full=tensors[SCORES],
        labels_note=note,
    )


def _rebuild_data(
    meta: Dict[str, Any], train_indices: Tensor, test_indices: Tensor
) -> Tuple[Optional[RecordedData], str]:
    """The recorded dataset through our fixed registry of datasets: a score file never runs code.

    Labels, file names and texts are a nicety: a moved data folder or an unknown
    dataset gives ``(None, reason)`` and the rest of the output (indices and scores).
    """
    from dattri_cli.data.recorded import rebuild_recorded_data  # noqa: PLC0415 - only when labels are wanted

    return rebuild_recorded_data(meta.get("config", {}), train_indices, test_indices)


def parse_test_indices(text: Optional[str], n_test: int) -> List[int]:
    """``"0,5,9"`` -> columns, each checked against the number of test samples."""
    if not text:
        return [0] if n_test else []
    try:
        cols = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        msg = f"--test takes comma-separated column numbers such as 0,5,9, got {text!r}"
        raise DattriError(msg) from exc
    bad = [c for c in cols if not 0 <= c < n_test]
    if bad:
        msg = f"--test {bad} out of range: the file has {n_test} test columns (0..{n_test - 1})"
        raise DattriError(msg)
    return cols


def top_training_samples(sf: ScoreFile, col: int, k: int) -> Dict[str, List[Dict[str, Any]]]:
    """The ``k`` strongest proponents and opponents of test column ``col``."""
    column = sf.column(col)
    k = min(k, column.numel())

    def rows(indices: Tensor) -> List[Dict[str, Any]]:
        out = []
        for row in indices.tolist():
            entry = {"row": row, "dataset_index": int(sf.train_indices[row]), "score": float(column[row])}
            if sf.data is not None:
                entry.update(sf.data.describe("train", row))
            out.append(entry)
        return out

    return {
        "proponents": rows(torch.topk(column, k).indices),
        "opponents": rows(torch.topk(-column, k).indices),
    }


def score_stats(sf: ScoreFile) -> Dict[str, Optional[float]]:
    """Min, max, mean, std and fraction positive, accumulated over row blocks."""
    count, total, total_sq, positive = 0, 0.0, 0.0, 0
    low, high = float("inf"), float("-inf")
    for block in sf.row_blocks():
        b = block.double()
        if b.numel() == 0:
            continue
        count += b.numel()
        total += float(b.sum())
        total_sq += float((b * b).sum())
        positive += int((b > 0).sum())
        low, high = min(low, float(b.min())), max(high, float(b.max()))
    if count == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "fraction_positive": None}
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return {"min": low, "max": high, "mean": mean, "std": var**0.5, "fraction_positive": positive / count}


def summarize(sf: ScoreFile, cols: List[int], k: int) -> Dict[str, Any]:
    """Everything ``show`` prints, as plain data."""
    meta = sf.metadata
    tests = []
    for col in cols:
        entry = {
            "column": col,
            "dataset_index": int(sf.test_indices[col]),
            **top_training_samples(sf, col, k),
        }
        if sf.data is not None:
            entry.update(sf.data.describe("test", col))
        tests.append(entry)
    return {
        "path": str(sf.path),
        "shape": list(sf.shape),
        "shards": len(sf.shards.entries) if sf.shards is not None else None,
        "attributor": meta.get("attributor", {}),
        "choices": meta.get("choices", {}),
        "versions": meta.get("versions", {}),
        "config_hash": meta.get("config_hash"),
        "diagnostics": meta.get("diagnostics", {}),
        "stats": score_stats(sf),
        "tests": tests,
    }


def _print_rich(summary: Dict[str, Any]) -> None:
    from dattri_cli.console import make_console  # noqa: PLC0415

    console = make_console()
    att = summary["attributor"]
    console.print(f"[bold]{summary['path']}[/]: scores {tuple(summary['shape'])} (train x test)")
    console.print(f"attributor {att.get('target')} {json.dumps(att.get('kwargs', {}), sort_keys=True)}")
    console.print(
        f"choices {summary['choices']}; versions {summary['versions']}; config hash {str(summary['config_hash'])[:12]}"
    )
    if summary["diagnostics"]:
        console.print(f"diagnostics {json.dumps(summary['diagnostics'], sort_keys=True)[:400]}")
    st = summary["stats"]
    if st["min"] is not None:
        console.print(
            f"scores: min {st['min']:.4g}, max {st['max']:.4g}, mean {st['mean']:.4g}, std "
            f"{st['std'] or 0:.4g}, positive {st['fraction_positive']:.1%}"
        )
    for test in summary["tests"]:
        console.print(_test_table(test))


def label_text(entry: Dict[str, Any]) -> str:
    """``2 (cat)``, ``0.731`` or ``""``: an entry's label as people read it."""
    if "label" not in entry:
        return ""
    value = entry["label"]
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} ({entry['class']})" if "class" in entry else text


def sample_text(entry: Dict[str, Any]) -> str:
    """What identifies a sample to a person: its file (image folders) or its text snippet."""
    return entry.get("path") or entry.get("text") or ""


def _test_table(test: Dict[str, Any]) -> Any:
    """One rich table per test column: a line per proponent and opponent, strongest first."""
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    entries = test["proponents"] + test["opponents"]
    has_label = "label" in test or any("label" in e for e in entries)
    what = "file" if "path" in test else "text" if "text" in test else None
    title = f"test column {test['column']} (dataset index {test['dataset_index']}"
    if has_label:
        title += f", label {label_text(test)}"
    title += ")"
    if what is not None:
        title += f": {sample_text(test)}"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("rank")
    table.add_column("score", justify="right")
    table.add_column("train row (#dataset index)")
    if has_label:
        table.add_column("label")
    if what is not None:
        table.add_column(what, no_wrap=True, overflow="ellipsis")
    for kind, group in (("proponent", test["proponents"]), ("opponent", test["opponents"])):
        for rank, e in enumerate(group, 1):
            cells = [f"{kind} {rank}", f"{e['score']:+.4g}", f"{e['row']} (#{e['dataset_index']})"]
            if has_label:
                cells.append(escape(label_text(e)))
            if what is not None:
                cells.append(escape(sample_text(e)))
            table.add_row(*cells)
    return table


def main(argv: List[str]) -> None:
    """``dattri show PATH [--test 0,5] [--top-k 5] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="dattri show",
        description="Show a score file: shape, metadata, statistics, top proponents/opponents.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", type=Path, help="a score file, or shards: their folder, a glob, or one shard file"
    )
    parser.add_argument("--test", help="test columns to explain, comma-separated (default: 0)")
    parser.add_argument(
        "--top-k", type=int, default=5, help="proponents/opponents per test column (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--no-labels", action="store_true", help="do not rebuild the dataset (labels, files, texts)"
    )
    args = parser.parse_args(argv)
    sf = open_score_file(args.path, with_data=not args.no_labels)
    if sf.labels_note:
        print(f"note: {sf.labels_note}", file=sys.stderr)
    summary = summarize(sf, parse_test_indices(args.test, sf.shape[1]), max(1, args.top_k))
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_rich(summary)
