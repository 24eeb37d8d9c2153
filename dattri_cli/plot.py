"""``dattri plot``: a test image beside its strongest proponents and opponents, and a histogram.

matplotlib is optional (``pip install 'dattri-cli[plot]'``); without it the command
says so instead of failing with an import error.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Optional

from dattri_cli.errors import DattriError
from dattri_cli.show import ScoreFile, open_score_file, parse_test_indices, top_training_samples

EXAMPLES = """examples:
  dattri plot scores.safetensors --test 3                  # writes scores.test3.png beside the file
  dattri plot scores.safetensors --test 3 --top-k 8 --out /tmp/explain.png
"""


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        msg = "dattri plot needs matplotlib: pip install 'dattri-cli[plot]' (or pip install matplotlib)"
        raise DattriError(msg) from exc
    return plt


def _side(num_features: int) -> Optional[int]:
    side = math.isqrt(num_features)
    return side if side * side == num_features else None


def plot_test(sf: ScoreFile, col: int, k: int, out: Path) -> Path:
    """Write a PNG explaining test column ``col``; returns the path written."""
    plt = _pyplot()
    top = top_training_samples(sf, col, k)
    split = sf.split
    side = _side(split.num_features) if split is not None else None
    fig = plt.figure(figsize=(2 + 1.6 * k, 6.2 if side else 3.2))
    rows = 3 if side else 1
    if side:
        ax = fig.add_subplot(rows, k + 1, 1)
        ax.imshow(split.x_test[col].reshape(side, side).cpu(), cmap="gray_r")
        ax.set_title(f"test {col}\nlabel {int(split.y_test[col])}", fontsize=9)
        ax.axis("off")
        for r, (kind, entries) in enumerate((("helps", top["proponents"]), ("hurts", top["opponents"]))):
            for i, e in enumerate(entries):
                ax = fig.add_subplot(rows, k + 1, r * (k + 1) + i + 2)
                ax.imshow(split.x_train[e["row"]].reshape(side, side).cpu(), cmap="gray_r")
                ax.set_title(f"{kind} {e['score']:+.3g}\nlabel {e['label']}", fontsize=8)
                ax.axis("off")
    ax = fig.add_subplot(rows, 1, rows)
    ax.hist(sf.column(col).double().cpu().tolist(), bins=50, color="#4477aa")
    ax.set_xlabel(f"score of each training sample on test column {col} (positive = helps)")
    ax.set_ylabel("count")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: List[str]) -> None:
    """``dattri plot PATH --test 3 [--top-k 5] [--out FILE.png]``."""
    parser = argparse.ArgumentParser(
        prog="dattri plot",
        description="Picture of a test sample, its top proponents/opponents (image data), and a score histogram.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a scores.safetensors file written by `dattri run`")
    parser.add_argument("--test", default="0", help="test columns, comma-separated (default 0); one PNG each")
    parser.add_argument("--top-k", type=int, default=5, help="proponents and opponents shown (default 5)")
    parser.add_argument(
        "--out", type=Path, help="PNG path (one test column only); default beside the score file"
    )
    args = parser.parse_args(argv)
    _pyplot()  # fail early and clearly without matplotlib
    sf = open_score_file(args.path)
    if sf.labels_note:
        print(f"note: {sf.labels_note}; plotting the score histogram only", file=sys.stderr)
    cols = parse_test_indices(args.test, sf.shape[1])
    if args.out and len(cols) > 1:
        msg = "--out names one file: give a single --test column, or leave --out out"
        raise DattriError(msg)
    for col in cols:
        out = args.out or args.path.with_name(f"{args.path.stem}.test{col}.png")
        print(plot_test(sf, col, max(1, args.top_k), out))
